"""Worker-side fleet hooks (registry heartbeat, exit when idle), connected through Celery signals."""

from __future__ import annotations
