"""The watchdog: runs in control workers, hands orphaned runs to other workers."""

from __future__ import annotations
