"""`orchestrator flower`: Flower with this project's Celery settings, auth and bounded state."""

from __future__ import annotations
