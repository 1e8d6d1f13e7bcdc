"""No-op Celery tasks for benchmarks/dispatch.py: the "raw Celery chord" baseline.

Configured from the project's own `celeryconfig` (same serializers, late acks,
prefetch, priority steps, result backend, events, ...). What differs from the
orchestrator path: the work done inside the tasks and around the submission, and what
the orchestrator's workers change in Celery's own work per task (tasks/overhead.py: one
Redis client per kombu channel, task events in timed batches; train_run stores no
success). These workers are plain Celery, the baseline the orchestrator is measured
against.
Start workers with the same flags the orchestrator uses, e.g.

    ORCH_BROKER_URL=redis://127.0.0.1:6379/1 celery -A benchmarks.noop_tasks worker \
        -Q cpu,gpu -c 1 -P prefork --without-mingle --without-gossip -E -n noop1@%h
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

app = Celery("bench_noop", set_as_current=False)
app.config_from_object("celeryconfig")
# celeryconfig reads ORCH_* once, at its first import; re-read them here so this app
# follows the environment even if celeryconfig was imported earlier in this process.
if os.environ.get("ORCH_BROKER_URL"):
    app.conf.broker_url = os.environ["ORCH_BROKER_URL"]
    app.conf.result_backend = os.environ.get("ORCH_RESULT_BACKEND", os.environ["ORCH_BROKER_URL"])


@app.task(name="bench.noop")
def noop(i: int) -> int:
    return i


@app.task(name="bench.done")
def done(results: list[Any]) -> int:
    return len(results)
