"""Thin Celery tasks: decode the spec, call plain Python, record the outcome.

Everything they receive comes from the broker and is treated as untrusted: specs are
parsed strictly (orchestrator.spec), trainers must be registered on this worker.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init

from orchestrator.errors import InvalidSpecError, UnknownTrainerError
from orchestrator.finalize import finalize_group, mark_group_failed
from orchestrator.livestate import LiveState
from orchestrator.paths import Layout
from orchestrator.runner import WorkerInfo, execute, record_failure
from orchestrator.spec import RunSpec
from orchestrator.trainers import registry

from . import app

log = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0


@functools.cache
def _layout() -> Layout:
    return Layout(app.conf.orch_results_root)


@functools.cache
def _live() -> LiveState:
    # Created lazily, in the process that uses it (never shared across a fork).
    return LiveState.from_url(app.conf.orch_state_url)


def _specs(specs: Any) -> list[RunSpec]:
    if not isinstance(specs, list) or not specs:
        raise InvalidSpecError("specs must be a non-empty list of run specs")
    parsed = [RunSpec.from_dict(s) for s in specs]
    if len({s.group_id for s in parsed}) != 1:
        raise InvalidSpecError("specs of one group must share their group_id")
    return parsed


@worker_init.connect
def _preload_in_parent(**_: Any) -> None:
    """In the worker's main process, before the pool forks: every pool child then starts
    with scikit-learn's splitters loaded instead of paying ~1 s on its first run. (Not at
    import time: `orchestrator submit` imports this module and needs none of it.)
    scikit-learn never touches CUDA (design invariant 5)."""
    import sklearn.model_selection  # noqa: F401  (orchestrator.datasets.split)


@worker_process_init.connect
def _preload_trainers(**_: Any) -> None:
    """Warm up trainers in each training pool child (`orchestrator worker --gpu/--cpu`
    sets ORCH_PRELOAD=1), in a thread: a child must report alive to its parent within
    worker_proc_alive_timeout (4 s), and `import torch` can take longer."""
    if os.environ.get("ORCH_PRELOAD") != "1":
        return

    def run() -> None:
        for trainer in registry().values():
            if trainer.preload is not None:
                try:
                    trainer.preload()
                except Exception:  # a failed warm-up only costs time later
                    log.exception("preloading trainer %s failed", trainer.name)

    threading.Thread(target=run, name="preload-trainers", daemon=True).start()


def backoff(retries: int) -> float:
    return min(RETRY_BASE_SECONDS * 2**retries, RETRY_MAX_SECONDS)


@app.task(name="tasks.train_run", bind=True)
def train_run(self: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run (one fold of one parameter point) on this worker's device."""
    run = RunSpec.from_dict(spec)  # raises InvalidSpecError: FAILURE, nothing touched
    worker = WorkerInfo.from_env(self.request.hostname or "unknown")
    attempt = self.request.retries + 1
    try:
        return execute(run, _layout(), worker, attempt, _live())
    except (UnknownTrainerError, InvalidSpecError) as exc:  # retrying cannot help
        record_failure(run, _layout(), worker, attempt, exc, will_retry=False, live=_live())
        raise
    except SoftTimeLimitExceeded:
        timeout = TimeoutError(f"run exceeded its timeout of {run.timeout:g} s")
        record_failure(run, _layout(), worker, attempt, timeout, will_retry=False, live=_live())
        raise timeout from None
    except Exception as exc:
        will_retry = self.request.retries < run.retries
        record_failure(run, _layout(), worker, attempt, exc, will_retry=will_retry, live=_live())
        if will_retry:
            log.warning("%s: attempt %d failed (%s); retrying", run.name, attempt, exc)
            raise self.retry(exc=exc, countdown=backoff(self.request.retries),
                             max_retries=run.retries) from exc
        raise


@app.task(name="tasks.finalize", bind=True)
def finalize(self: Any, results: Any, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Chord body: ensemble outputs, final_results.csv rows, status.json DONE."""
    group = _specs(specs)
    try:
        record = finalize_group(_layout(), group, _live())
    except Exception as exc:
        # Recorded here, with its reason: the chord error callback only learns a task id.
        mark_group_failed(_layout(), group, reason=f"{type(exc).__name__}: {exc}", live=_live())
        raise
    return {"group_id": record["group_id"], "train_status": record["train_status"]}


@app.task(name="tasks.group_failed")
def group_failed(task_id: str, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Chord error callback: status.json FAILED with which folds failed and why."""
    record = mark_group_failed(_layout(), _specs(specs), live=_live())
    return {"group_id": record["group_id"], "train_status": record["train_status"],
            "failed": record["failed"]}
