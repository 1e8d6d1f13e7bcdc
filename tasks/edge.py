"""The broker edge in a worker: kombu's Redis pop replaced by one that checks every
message (orchestrator.execution.edge: what is checked and why) before kombu, Celery or
the pool touch it, records each refusal once in the dead letters (tasks.deadletters),
and stamps each delivery with its taker.
"""


from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Mapping
from queue import Empty
from typing import Any

from celery.signals import worker_init, worker_ready

from orchestrator.execution.edge import Refused, check

from . import app
from .deadletters import record

log = logging.getLogger(__name__)
# [node name, pid] of this worker's main process, stamped on every delivery (the
# property TAKER): the watchdog hands on a delivery whose taker is no longer in the
# registry at once, instead of waiting out the orphan grace. Set at worker_ready,
# before the consumer's loop makes its first pop.
TAKER = "orch_taker"
_taker: list[Any] | None = None

@functools.cache
def _registered() -> Mapping[str, Any]:
    """This project's tasks registered in this worker (read once the app is final)."""
    return {name: task for name, task in app.tasks.items() if name.startswith("tasks.")}


def admit(queue: str, item: bytes) -> dict[str, Any] | None:
    """The decoded envelope of a popped item, or None: refused and recorded."""
    try:
        return check(item, queue, _registered())
    except Refused as exc:
        record(str(exc), queue, item, exc.task_id, exc.task)
    except Exception as exc:  # a bug here must not end the worker either
        log.exception("the edge check failed")
        record(f"the edge check failed: {type(exc).__name__}: {exc}", queue, item)
    return None


def _brpop_read(self: Any, **options: Any) -> bool:
    """kombu 5.7.0's `Channel._brpop_read`, with `admit` between the pop and the
    delivery, and a delivery that raises taken out of the unacknowledged messages."""
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

    try:
        try:
            dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
        except self.connection_errors:
            # if there's a ConnectionError, disconnect so the next
            # iteration will reconnect automatically.
            self.client.connection.disconnect()
            raise
        if dest__item:
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            if dest.endswith(".pidbox"):  # an answer to `inspect`/`control`, not a task
                self.connection._deliver(loads(bytes_to_str(item)), dest)
                return True
            message = admit(dest, item)
            if message is not None:
                _deliver(self, message, dest, item)
            return True
        raise Empty()
    finally:
        self._in_poll = None
        # kombu 5.7: the BRPOP connection is idle now, the moment to send a pending re-auth.
        self._flush_brpop_reauth()


def _deliver(channel: Any, message: dict[str, Any], queue: str, item: bytes) -> None:
    """Hand an admitted message to Celery. Whatever Celery raises for it (a case the
    checks missed) must not end the worker and then, restored at shutdown, the next
    one: the message leaves the unacknowledged messages and goes to the dead letters.
    Connection errors go on up: kombu reconnects and restores the message."""
    if _taker is not None:  # kept with the message in kombu's unacknowledged hash
        message["properties"][TAKER] = _taker
    try:
        channel.connection._deliver(message, queue)
    except channel.connection_errors:
        raise
    except Exception as exc:
        log.exception("delivering a message from queue %r failed", queue)
        tag = message["properties"]["delivery_tag"]
        with contextlib.suppress(Exception):
            channel.qos.reject(tag, requeue=False)
        headers = message["headers"]
        record(f"the worker failed on it: {type(exc).__name__}: {str(exc)[:300]}", queue, item,
               headers.get("id"), headers.get("task"))


def guard_consumers() -> None:
    """Install `_brpop_read` on kombu's Redis channel class, in this process (a worker's,
    before its consumer connects: a channel binds its handler when it is made). Raises
    if kombu's channel is not what this was written for (kombu 5.7.0, pinned): a worker
    without its edge must not start."""
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if channel._brpop_read is _brpop_read:
        return
    missing = [a for a in ("_brpop_read", "_flush_brpop_reauth", "sep") if not hasattr(channel, a)]
    if missing:
        raise RuntimeError(f"kombu's Redis channel lacks {', '.join(missing)}: the broker edge "
                           "(tasks/edge.py) was written for kombu 5.7.0; the worker cannot start without it")
    channel._brpop_read = _brpop_read  # type: ignore[method-assign]


@worker_init.connect
def _in_worker(**_: Any) -> None:
    try:
        guard_consumers()
    except RuntimeError as exc:
        # Celery's signals swallow a receiver's exceptions: stop the start itself.
        log.critical("%s", exc)
        raise SystemExit(f"worker not started: {exc}") from None


@worker_ready.connect
def _name_taker(sender: Any = None, **_: Any) -> None:
    global _taker
    _taker = [str(getattr(sender, "hostname", "")), os.getpid()]
