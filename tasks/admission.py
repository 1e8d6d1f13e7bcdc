"""GPU workers: stop taking runs while their GPU lacks memory or a free share, and take
them again once it has (orchestrator.execution.admission has the rules).

A training task that cannot start on this GPU hands its run back (the message goes
back to the head of its queue, for another GPU) and asks its own worker to stop
consuming; a thread in the worker's main process resumes consuming once NVML shows
the memory free and the shares allow it, or after WAIT_MAX_SECONDS in any case (the
next run is then checked again).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import worker_ready

from orchestrator import settings

from . import app

log = logging.getLogger(__name__)
CHECK_SECONDS = 2.0
WAIT_MAX_SECONDS = 60.0


def stop_consuming(hostname: str) -> None:
    """Ask this worker (through its remote-control mailbox) to stop fetching runs."""
    for queue in sorted(app.amqp.queues.consume_from or {}):
        app.control.cancel_consumer(queue, destination=[hostname], reply=False)


def _shares() -> Any:
    from orchestrator import keys
    from orchestrator.execution.admission import Shares

    return Shares(keys.client(app.conf.orch_state_url))


def _watch(hostname: str, queues: list[str], stop: threading.Event) -> None:
    from orchestrator.execution.admission import Need

    host = hostname.split("@", 1)[-1]
    shares = _shares()
    while not stop.wait(CHECK_SECONDS):
        try:
            waiting = shares.waiting(hostname)
            if waiting is None:
                continue
            need = Need(share=float(waiting["share"]), memory_mb=int(waiting["memory_mb"]),
                        count=int(waiting.get("count", 1)))
            gpus = [int(i) for i in waiting["gpus"]]
            ready = shares.room(host, gpus, need)
            if ready or time.time() - float(waiting["since"]) > WAIT_MAX_SECONDS:
                for queue in queues:
                    app.control.add_consumer(queue, destination=[hostname], reply=False)
                shares.stop_waiting(hostname)
                log.warning("GPU %s %s: taking runs again", ",".join(map(str, gpus)),
                            "has room" if ready else f"still busy after {WAIT_MAX_SECONDS:.0f} s")
        except Exception as exc:  # Redis restarting: look again later
            log.info("admission watcher: %s", exc)


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    if settings.value("ORCH_DEVICE") != "cuda" or not settings.value("ORCH_GPU"):
        return
    hostname = getattr(sender, "hostname", "")
    queues = sorted(app.amqp.queues.consume_from or {})
    threading.Thread(target=_watch, args=(hostname, queues, threading.Event()),
                     name="orch-admission", daemon=True).start()
