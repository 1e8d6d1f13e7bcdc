"""Refused messages in the dead letters (orchestrator.execution.deadletters): the edge's
refusals (tasks.edge) and Celery's own (an unknown format, an unregistered task).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.signals import task_rejected, task_unknown

from . import app

log = logging.getLogger(__name__)


@functools.cache
def _dead_letters() -> Any:
    from orchestrator.execution.deadletters import DeadLetters

    return DeadLetters.from_url(app.conf.orch_state_url)


def record(reason: str, queue: str | None, raw: Any, task_id: str | None = None,
           task: str | None = None) -> None:
    """A refusal in the dead letters, and in the log (also when Redis cannot take it)."""
    log.warning("refused a message from queue %r (task %s, id %s): %s", queue, task, task_id, reason)
    try:
        _dead_letters().add(reason, task_id=task_id, task=task, queue=queue, raw=raw)
    except Exception as exc:  # the worker keeps serving; the log above has the reason
        log.error("could not record the refused message in the dead letters: %s", exc)


def _origin(message: Any) -> tuple[str | None, str | None, str | None]:
    headers = getattr(message, "headers", None) or {}
    info = getattr(message, "delivery_info", None) or {}
    return (info.get("routing_key"), headers.get("id") if isinstance(headers, dict) else None,
            headers.get("task") if isinstance(headers, dict) else None)


@task_rejected.connect
def _celery_rejected(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    """Celery refused a message the edge let through (an unknown format, an invalid
    ETA): it is acknowledged and dropped; recorded here with Celery's reason."""
    queue, task_id, task = _origin(message)
    record(f"Celery refused it: {type(exc).__name__ if exc else 'unknown message format'}: {exc or ''}",
           queue, getattr(message, "body", None), task_id, task)


@task_unknown.connect
def _celery_unknown(message: Any = None, exc: BaseException | None = None, name: str | None = None,
                    id: str | None = None, **_: Any) -> None:
    queue = _origin(message)[0]
    record(f"Celery refused it: task {name!r} is not registered", queue, getattr(message, "body", None), id, name)
