"""`orchestrator report`: a self-contained HTML report with plots."""

from __future__ import annotations
