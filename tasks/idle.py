"""Exit when idle (ORCH_EXIT_WHEN_IDLE=SECONDS, set by `orchestrator worker
--exit-when-idle`): once the worker has held no task and all its queues have been empty
for that long, it stops itself (warm shutdown, exit code 0), so a node borrowed from a
batch scheduler is handed back when the work is done (seed 001). Started by tasks.fleet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def queued(queues: list[str], conn: Any) -> int:
    from kombu.exceptions import ChannelError

    total = 0
    channel = conn.default_channel
    for queue in queues:
        try:
            total += int(channel.queue_declare(queue, passive=True).message_count)
        except ChannelError:  # Redis deletes an empty list: the queue does not exist
            continue
    return total


def idle_loop(app: Any, queues: list[str], seconds: float, stop: threading.Event,
              busy: Callable[[], int], stopping: Callable[[], None]) -> None:
    """Stop this worker warmly once it held nothing (`busy()` == 0) and its queues were
    empty for `seconds`; `stopping()` marks its registry record first."""
    poll = min(1.0, seconds / 4)
    idle_since: float | None = None
    conn = None
    while not stop.wait(poll):
        try:
            if conn is None:
                conn = app.connection_for_read()
            idle = busy() == 0 and queued(queues, conn) == 0
        except Exception as exc:  # broker unreachable: not evidence of idleness
            log.warning("exit-when-idle: cannot read queue lengths: %s", exc)
            if conn is not None:
                conn.release()
            conn, idle = None, False
        now = time.monotonic()
        if not idle:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= seconds:
            log.warning("no task and empty queues %s for %gs: shutting down (--exit-when-idle)",
                        ",".join(queues), seconds)
            stopping()
            _request_warm_shutdown()
            return


def _request_warm_shutdown() -> None:
    """What Celery's own warm-shutdown signal handler does, with exit code 0: the consumer
    loop sees the flag within a second or two and stops. (SIGTERM is not used: `orchestrator
    worker` remaps it to a cold shutdown, which exits with 1, read as a crash by supervisors.)"""
    from celery.worker import state

    state.should_stop = 0


