"""Worker start hooks: what a worker's main process loads before its pool forks, so that
no pool process pays for it on its first run; and the control worker's search imports.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_init, worker_ready

from orchestrator import settings
from orchestrator.errors import EXIT_USAGE, TrainerModuleError
from orchestrator.trainers import registry

from . import app

log = logging.getLogger(__name__)


def _queues() -> set[str]:
    selected = app.amqp.queues.consume_from
    return set(selected if selected is not None else app.amqp.queues)


@worker_init.connect
def _preload_in_parent(**_: Any) -> None:
    """In the worker's main process, before the pool forks, so every pool child starts
    with these modules loaded: scikit-learn's splitters (~1 s otherwise), its dataset
    loaders and its first-use work (~55 ms of a pool process's first run), and on
    training workers (`orchestrator worker --gpu/--cpu` set ORCH_PRELOAD=1) each
    trainer's imports. Training workers fork a fresh child per run on GPUs
    (--max-tasks-per-child 1), and `import torch` took 3.5 s of every run's start on an
    H100 host when it ran in the child. Trainer preloads import only: CUDA stays
    uninitialised in this process (design invariant 5, docs/reliability.md). (Not at
    import time: `orchestrator submit` imports this module and needs none of it.)"""
    from orchestrator.experiment.datasets import warm_up

    # The trainers of a worker that may train, loaded now: a module of
    # ORCH_TRAINER_MODULES that cannot be imported stops it at its start (a clear line in
    # its log, exit 2), where otherwise every run it took would fail on it. A worker of
    # the `control` queue alone never trains, and needs no trainer installed.
    if _queues() - {"control"}:
        try:
            registry()
        except TrainerModuleError as exc:
            log.critical("%s: this worker cannot run its trainers and stops", exc)
            raise SystemExit(EXIT_USAGE) from exc
    warm_up()  # scikit-learn's imports and first-use work (orchestrator.experiment.datasets)

    if not settings.value("ORCH_PRELOAD"):
        return
    only = settings.value("ORCH_PRELOAD_TRAINERS")
    for trainer in registry().values():
        if trainer.preload is not None and (only is None or trainer.name in only):
            try:
                trainer.preload()
            except Exception:  # a failed warm-up only costs time later
                log.exception("preloading trainer %s failed", trainer.name)


@worker_ready.connect
def _search_imports_on_control(**_: Any) -> None:
    """A control worker runs the search steps: their imports (Optuna's ~0.25 s, more on a
    loaded host) are done in the background once it consumes, so that a search resumed
    by a restarted control worker sends its next proposals without waiting for them,
    and no worker's start waits for them (a local `run` of a sweep never needs them).
    Training workers never import Optuna."""
    if _queues() == {"control"}:
        threading.Thread(target=_import_search, name="search-imports", daemon=True).start()


def _import_search() -> None:
    try:
        import optuna  # noqa: F401

        import orchestrator.search.engine  # noqa: F401
        import orchestrator.search.samplers  # noqa: F401
    except ImportError:  # only costs time later
        log.exception("importing the search steps' modules failed")
