"""Commands that steer experiments on a running cluster: cancel (pause/resume later)."""

from __future__ import annotations
