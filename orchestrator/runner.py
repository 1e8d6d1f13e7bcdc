"""Execute one run: plain Python, no Celery. The `train_run` task is a thin wrapper.

Order of writes: fold status IN_PROGRESS; the four output files (each atomic,
metadata.json last); fold status DONE. A fold counts as DONE only when its status
says so *and* all four files exist, so a crash between writes is simply re-run.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import datasets
from .errors import InvalidSpecError
from .livestate import LiveState
from .metrics import fmt, ranks, scores, table_csv
from .paths import Layout, atomic_write_json, atomic_write_text, read_json
from .spec import RunSpec
from .status import Status, file_sizes, fold_is_done, write_fold_status
from .trainers import Reporter, TrainContext, get_trainer


@dataclass(frozen=True)
class WorkerInfo:
    """Who executes the run: filled from the Celery request and the worker's env."""

    name: str  # Celery node name, e.g. gpu0@host
    device: str  # "cuda" or "cpu"
    gpu: str | None  # CUDA_VISIBLE_DEVICES of the worker
    host: str = socket.gethostname()

    @classmethod
    def from_env(cls, name: str) -> WorkerInfo:
        """ORCH_DEVICE (set by `orchestrator worker`) decides; a plain `celery worker`
        started with a non-empty CUDA_VISIBLE_DEVICES is a GPU worker too."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        device = os.environ.get("ORCH_DEVICE") or ("cuda" if visible and visible != "-1" else "cpu")
        if device not in ("cuda", "cpu"):
            raise RuntimeError(f"ORCH_DEVICE={device!r} on worker {name}: must be cuda or cpu")
        return cls(name=name, device=device, gpu=(visible or None) if device == "cuda" else None)


def summary(layout: Layout, spec: RunSpec) -> dict[str, Any]:
    """What a finished run reports back (small: it travels through the result backend)."""
    meta = read_json(layout.fold_files(spec)["metadata.json"]) or {}
    return {"run_id": spec.run_id, "name": spec.name, "status": Status.DONE.value,
            "metrics": meta.get("metrics", {}), "worker": meta.get("worker")}


def execute(spec: RunSpec, layout: Layout, worker: WorkerInfo, attempt: int,
            live: LiveState | None = None) -> dict[str, Any]:
    """Train one run and write its outputs; returns its summary. Raises on failure."""
    if fold_is_done(layout, spec):  # a redelivered or resubmitted run that already finished
        return {**summary(layout, spec), "skipped": True}
    trainer = get_trainer(spec.trainer)
    if trainer.version != spec.trainer_version:
        raise RuntimeError(f"trainer {spec.trainer!r} is version {trainer.version} on this worker, "
                           f"the run was submitted for version {spec.trainer_version}")
    params = trainer.resolve(spec.params_for(worker.device))
    problems = [f"{name}: {problem}" for name, value in params.items()
                if (problem := trainer.params[name].problem(value) if name in trainer.params
                    else f"unknown parameter of trainer {trainer.name!r}")]
    if problems:  # a message that bypassed validation: refuse before touching anything
        raise InvalidSpecError(f"invalid params for {spec.name}: {'; '.join(problems)}")
    started = time.time()
    record = write_fold_status(layout, spec, Status.IN_PROGRESS, attempt=attempt,
                               worker=worker.name, host=worker.host, gpu=worker.gpu,
                               device=worker.device, started_at=started, finished_at=None,
                               error=None)
    if live:
        live.set_run(spec.experiment, spec.run_id, Status.IN_PROGRESS.value,
                     worker=worker.name, attempt=attempt)

    table = datasets.load(spec.dataset)
    split = datasets.split(table, spec)
    reporter = Reporter()
    eval_rows = np.concatenate([split.val, split.holdout])
    result = trainer.fn(TrainContext(
        params=params, device=worker.device, seed=spec.seed, fold=spec.fold, run_name=spec.name,
        X_train=table.X[split.train], y_train=table.y[split.train], X_eval=table.X[eval_rows],
        n_classes=len(table.classes), reporter=reporter,
    ))
    probs = np.asarray(result.probabilities, dtype=np.float64)
    if probs.shape != (len(eval_rows), len(table.classes)):
        raise RuntimeError(f"trainer {spec.trainer!r} returned probabilities of shape {probs.shape}, "
                           f"expected {(len(eval_rows), len(table.classes))}")
    elapsed = time.time() - started
    n_val = len(split.val)
    metrics = scores(table.y[split.val], probs[:n_val])
    holdout_metrics = scores(table.y[split.holdout], probs[n_val:])
    _write_outputs(layout, spec, table, eval_rows, n_val, probs)
    atomic_write_json(layout.fold_files(spec)["metadata.json"], {
        "run_id": spec.run_id, "name": spec.name, "spec": spec.to_dict(),
        "params_resolved": params, "metrics": metrics, "holdout_metrics": holdout_metrics,
        "params_count": result.params_count, "training_seconds": round(elapsed, 4),
        "device": worker.device, "gpu": worker.gpu, "worker": worker.name, "host": worker.host,
        "attempt": attempt, "classes": list(table.classes), "n_train": len(split.train),
        "n_val": n_val, "n_holdout": len(split.holdout), "last_report": reporter.last,
        "trainer_info": dict(result.info),
    })
    write_fold_status(layout, spec, Status.DONE, base=record, finished_at=time.time(),
                      elapsed=round(elapsed, 4), error=None, metrics=metrics,
                      files=file_sizes(layout.fold_files(spec)))
    if live:
        live.set_run(spec.experiment, spec.run_id, Status.DONE.value, worker=worker.name,
                     attempt=attempt)
    return {"run_id": spec.run_id, "name": spec.name, "status": Status.DONE.value,
            "metrics": metrics, "worker": worker.name}


def _write_outputs(layout: Layout, spec: RunSpec, table: datasets.Table, rows: np.ndarray,
                   n_val: int, probs: np.ndarray) -> None:
    files = layout.fold_files(spec)
    split_of = ["val"] * n_val + ["holdout"] * (len(rows) - n_val)
    classes = list(table.classes)
    pred = probs.argmax(axis=1)
    atomic_write_text(files["predictions.csv"], table_csv(
        ["index", "split", "y_true", "y_pred"],
        [(int(r), s, classes[table.y[r]], classes[p]) for r, s, p in zip(rows, split_of, pred, strict=True)]))
    atomic_write_text(files["probabilities.csv"], table_csv(
        ["index", "split", *classes],
        [(int(r), s, *map(fmt, pr)) for r, s, pr in zip(rows, split_of, probs, strict=True)]))
    atomic_write_text(files["ranks.csv"], table_csv(
        ["index", "split", *classes],
        [(int(r), s, *rk) for r, s, rk in zip(rows, split_of, ranks(probs), strict=True)]))


def record_failure(spec: RunSpec, layout: Layout, worker: WorkerInfo, attempt: int,
                   exc: BaseException, will_retry: bool, live: LiveState | None = None) -> str:
    """Mark the fold FAILED (or PENDING when a retry follows); return the error text."""
    error = f"{type(exc).__name__}: {exc}"
    status = Status.PENDING if will_retry else Status.FAILED
    write_fold_status(layout, spec, status, attempt=attempt, worker=worker.name, host=worker.host,
                      finished_at=time.time(), error=error,
                      traceback="".join(traceback.format_exception(exc))[-4000:])
    if live:
        live.set_run(spec.experiment, spec.run_id, status.value, worker=worker.name,
                     attempt=attempt, error=error)
    return error
