"""Training workers replace a finished pool process at once, not up to 5 s later.

GPU workers run every run in a fresh pool process (--max-tasks-per-child 1). Celery's
prefork pool replaces an exited process when its sentinel pipe becomes readable, but
the pipe can close a moment before the process can be reaped: the pool then finds no
exited process and waits for its 5-second maintenance timer (seen on 1 run in 4 on a
2-core machine, and as a ~3.4 s gap before nearly every run on an H100 host, where a
process that used CUDA takes longer to die). Each such wait is lost GPU time. This
worker step runs the pool's maintenance every 0.2 s as well; it costs one
`waitpid(WNOHANG)` per pool process.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import bootsteps
from celery.signals import worker_before_create_process

from . import app

INTERVAL_SECONDS = 0.2


class PromptRespawn(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool", "celery.worker.components:Hub"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        # (worker.hub is made after every step's __init__: checked in start)
        self.enabled = bool(getattr(worker, "max_tasks_per_child", None))

    def start(self, worker: Any) -> None:
        pool = getattr(worker.pool, "_pool", None)
        maintain = getattr(pool, "maintain_pool", None)
        if maintain is not None and getattr(worker, "hub", None) is not None:
            worker.hub.call_repeatedly(INTERVAL_SECONDS, maintain)


app.steps["worker"].add(PromptRespawn)


_frozen = False


@worker_before_create_process.connect
def _freeze_once(**_: Any) -> None:
    """Celery runs a full gc.collect() before it forks each pool process (celery#2927):
    over a worker's preloaded heap (scikit-learn, the trainers' torch) that took 0.28 s
    of every worker's start, and of every run on GPU workers (a fresh process each).
    Sent just before it, the first time: everything loaded by then (the worker's imports
    and preloads) leaves the collector's reach (gc.freeze), so each later collection
    walks only what came after, and pool processes share those pages unwritten."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()
