"""Execute one run: plain Python, no Celery. The `train_run` task is a thin wrapper.

Order of writes: fold status IN_PROGRESS; the four output files into a hidden staging
folder of this attempt; one rename of that folder to `fold_<i>/` (only while the
attempt still holds its lease: see orchestrator.execution.leases); fold status DONE with the
files' sizes. A fold counts as DONE only when its status says so *and* the files are
as written, so a crash between writes is simply re-run.

Those writes go through a Sink: SharedSink is the results root as above; a worker
without it (orchestrator.execution.returns.ReturnSink) keeps the marks in Redis, stages in a
scratch folder, and commits by returning the files for the control worker to write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import settings
from ..collect.metrics import csv_cells, prob_text, ranks, scores, table_csv
from ..collect.status import Status, file_sizes, fold_state, read_fold_status, write_fold_status
from ..errors import InvalidSpecError, RunStopped
from ..experiment import datasets
from ..experiment.spec import RunSpec, check_params
from ..livestate import LiveState
from ..paths import FSYNC, Layout, fsync_dir, fsync_folder, json_bytes, read_json, start_writeback
from ..trainers import Reporter, TrainContext, Trainer, get_trainer


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
        device = settings.value("ORCH_DEVICE") or ("cuda" if visible and visible != "-1" else "cpu")
        return cls(name=name, device=device, gpu=(visible or None) if device == "cuda" else None)


def write_new(path: Path, text: str | bytes) -> None:
    """A new file in a staging folder (no rename needed: the folder is renamed); its data
    starts going to the disk at once, and fsync_folder waits for all of them."""
    with open(path, "xb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
        if FSYNC:
            fh.flush()
            start_writeback(fh.fileno())


def summary(layout: Layout, spec: RunSpec) -> dict[str, Any]:
    """What a finished run reports back (small: it travels through the result backend)."""
    meta = read_json(layout.fold_files(spec)["metadata.json"]) or {}
    return {"run_id": spec.run_id, "name": spec.name, "status": Status.DONE.value,
            "metrics": meta.get("metrics", {}), "worker": meta.get("worker")}


class Sink(Protocol):
    """Where an attempt's status marks and outputs go: files under the shared results
    root (SharedSink), or Redis, back to the control worker (orchestrator.execution.returns)."""

    def fold_state(self, spec: RunSpec, submitted_at: float | None = None) -> tuple[str, dict[str, Any]]: ...

    def read_status(self, spec: RunSpec) -> dict[str, Any] | None: ...

    def write_status(self, spec: RunSpec, status: Status, base: dict[str, Any] | None = None,
                     **fields: Any) -> dict[str, Any]: ...

    def staging_dir(self, spec: RunSpec, tag: str) -> Path: ...

    # Before training, by the attempt holding the run: clear what dead or fenced
    # attempts left; the fold's DONE record if its outputs were committed by an attempt
    # that died before it could say so (then nothing is trained again).
    def prepare(self, spec: RunSpec, guard: Guard, record: dict[str, Any]) -> dict[str, Any] | None: ...

    def commit(self, spec: RunSpec, staging: Path, guard: Guard) -> dict[str, int]: ...  # file sizes

    def summary(self, spec: RunSpec, record: dict[str, Any]) -> dict[str, Any]: ...

    def run_log(self, spec: RunSpec, attempt: int) -> Path: ...


class SharedSink:
    """The worker sees the results root: it writes there itself."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def fold_state(self, spec: RunSpec, submitted_at: float | None = None) -> tuple[str, dict[str, Any]]:
        return fold_state(self.layout, spec)

    def read_status(self, spec: RunSpec) -> dict[str, Any] | None:
        return read_fold_status(self.layout, spec)

    def write_status(self, spec: RunSpec, status: Status, base: dict[str, Any] | None = None,
                     **fields: Any) -> dict[str, Any]:
        return write_fold_status(self.layout, spec, status, base=base, **fields)

    def staging_dir(self, spec: RunSpec, tag: str) -> Path:
        return self.layout.staging_dir(spec, tag)

    def prepare(self, spec: RunSpec, guard: Guard, record: dict[str, Any]) -> dict[str, Any] | None:
        clear_staging(self.layout, spec, keep=guard.tag)
        final = self.layout.fold_dir(spec)
        if not os.path.lexists(final):
            return None
        meta = read_json(final / "metadata.json")
        if isinstance(meta, dict) and meta.get("run_id") == spec.run_id and record.get("status") != Status.DONE.value:
            # Committed (one rename, after its fence check) by an attempt that died before
            # its DONE mark: those outputs are the run's; say so instead of training again.
            paths = self.layout.fold_files(spec)
            if all(p.is_file() for p in paths.values()):
                guard.check()
                return adopt(self.layout, spec, meta, record)
        # Damaged (a DONE record whose files are not as written) or another run's
        # outputs in this folder: removed, by the attempt holding the run (fresh check).
        guard.check()
        move_aside(final, self.layout.staging_dir(spec, guard.tag + ".old"))
        return None

    def commit(self, spec: RunSpec, staging: Path, guard: Guard) -> dict[str, int]:
        commit_folder(staging, self.layout.fold_dir(spec), spec.run_id)
        return file_sizes(self.layout.fold_files(spec))

    def summary(self, spec: RunSpec, record: dict[str, Any]) -> dict[str, Any]:
        return summary(self.layout, spec)

    def run_log(self, spec: RunSpec, attempt: int) -> Path:
        return self.layout.run_log(spec, attempt)


class Guard(Protocol):
    """The fence of one attempt (orchestrator.attempts.LeaseGuard on a worker)."""

    tag: str  # unique per attempt: names its staging folder

    def stop_reason(self) -> str | None: ...  # cheap: asked at every trainer report

    # Raises RunStopped unless this attempt may write; fresh=False: from what the
    # attempt already knows (its renewals), without asking Redis.
    def check(self, fresh: bool = True) -> None: ...


class _NoGuard:
    """Outside a cluster (direct calls, tests of the runner): nothing can fence."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex

    def stop_reason(self) -> str | None:
        return None

    def check(self, fresh: bool = True) -> None:
        return None


def runnable(spec: RunSpec, device: str, after_oom: bool = False) -> tuple[Trainer, dict[str, Any]]:
    """The run's trainer and its resolved params on `device`, or the reason this worker
    refuses the message: UnknownTrainerError (not registered here; nothing imported),
    InvalidSpecError (another trainer version, or params the trainer refuses). Called
    before the run is claimed, so a refused message never touches the run's records."""
    trainer = get_trainer(spec.trainer)
    if trainer.version != spec.trainer_version:
        raise InvalidSpecError(f"trainer {spec.trainer!r} is version {trainer.version} on this worker, "
                               f"the run was submitted for version {spec.trainer_version}")
    check_params(spec, trainer)  # params and every device's overrides, on every worker
    params = trainer.resolve(spec.params_for(device, after_oom))
    problems = [f"{name}: {problem}" for name, value in params.items()
                if (problem := trainer.params[name].problem(value) if name in trainer.params
                    else f"unknown parameter of trainer {trainer.name!r}")]
    if problems:  # a message that bypassed validation: refuse before touching anything
        raise InvalidSpecError(f"invalid params for {spec.name}: {'; '.join(problems)}")
    return trainer, params


def is_cuda_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda.OutOfMemoryError), or an error that says so."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def execute(spec: RunSpec, layout: Layout, worker: WorkerInfo, attempt: int,
            live: LiveState | None = None, guard: Guard | None = None,
            lost: int = 0, after_oom: bool = False, sink: Sink | None = None,
            found: tuple[str, dict[str, Any]] | None = None, marked: bool = False,
            dist: Any = None, watch: Any = None) -> dict[str, Any]:
    """Train one run and commit its outputs (to `sink`, by default the results root);
    returns its summary. Raises on failure, and RunStopped (after removing what it
    wrote) when the guard says it may not commit. `live` gets the IN_PROGRESS mark and
    the progress reports (unless `marked`: the caller set IN_PROGRESS there already);
    the caller marks the run DONE there (train_run: in the round trip that releases the
    lease). `found`: the fold's (state, record) if the caller has just read it, under
    the lease. `dist` and `watch`: rank 0 of a data-parallel run (orchestrator.execution.ranks):
    the trainer gets `dist`, and stops when the gang's watch says so."""
    sink = sink or SharedSink(layout)
    state, current = found or sink.fold_state(spec)
    if state == Status.DONE.value:  # a redelivered or resubmitted run that already finished
        return {**sink.summary(spec, current), "skipped": True}
    guard = guard or _NoGuard()
    after_oom = after_oom and worker.device == "cuda" and bool(spec.overrides.get("cuda_oom"))
    trainer, params = runnable(spec, worker.device, after_oom)
    if (adopted := sink.prepare(spec, guard, current)) is not None:
        return {**sink.summary(spec, adopted), "skipped": True, "adopted": True}
    started = time.time()
    record = sink.write_status(spec, Status.IN_PROGRESS, base=current, attempt=attempt,
                               worker=worker.name, host=worker.host, gpu=worker.gpu,
                               device=worker.device, started_at=started, finished_at=None,
                               error=None, lost_attempts=lost, oom_overrides=after_oom,
                               history=start_attempt(current, attempt, worker, started))
    if live and not marked:
        live.set_run(spec.experiment, spec.run_id, Status.IN_PROGRESS.value,
                     worker=worker.name, attempt=attempt)

    table = datasets.load(spec.dataset)
    split = datasets.split(table, spec)
    on_report = _progress_sender(live, spec, worker) if live else None
    should_stop = guard.stop_reason
    if watch is not None:  # rank 0: its step goes into its rank lease; a lost peer stops it
        should_stop = _either(guard.stop_reason, lambda: watch.stop_why)
        on_report = _also(on_report, lambda last: watch.step(last.get("epoch")))
    if live and spec.report_at:  # an ASHA search's run: its reports at the rungs go to the control side
        from ..search.rungs import sender

        on_report = _also(on_report, sender(live, spec))
    reporter = Reporter(should_stop=should_stop, on_report=on_report)
    eval_rows = np.concatenate([split.val, split.holdout])
    result = trainer.fn(TrainContext(
        params=params, device=worker.device, seed=spec.seed, fold=spec.fold, run_name=spec.name,
        X_train=table.X[split.train], y_train=table.y[split.train], X_eval=table.X[eval_rows],
        n_classes=len(table.classes), reporter=reporter, dist=dist,
    ))
    probs = np.asarray(result.probabilities, dtype=np.float64)
    if probs.shape != (len(eval_rows), len(table.classes)):
        raise RuntimeError(f"trainer {spec.trainer!r} returned probabilities of shape {probs.shape}, "
                           f"expected {(len(eval_rows), len(table.classes))}")
    elapsed = time.time() - started
    n_val = len(split.val)
    metrics = scores(table.y[split.val], probs[:n_val])
    holdout_metrics = scores(table.y[split.holdout], probs[n_val:])
    # A zombie stops here, before writing anything: one known as such, or one that Redis
    # has not confirmed for half a lease (cut off, paused) asks Redis first.
    guard.check(fresh=False)
    staging = sink.staging_dir(spec, guard.tag)
    try:
        _write_outputs(staging, table, eval_rows, n_val, probs, {
            "run_id": spec.run_id, "name": spec.name, "spec": spec.to_dict(),
            "params_resolved": params, "metrics": metrics, "holdout_metrics": holdout_metrics,
            "params_count": result.params_count, "training_seconds": round(elapsed, 4),
            "device": worker.device, "gpu": worker.gpu, "worker": worker.name, "host": worker.host,
            "attempt": attempt, "classes": list(table.classes), "n_train": len(split.train),
            "n_val": n_val, "n_holdout": len(split.holdout), "last_report": reporter.last,
            "trainer_info": dict(result.info),
        })
        guard.check()
        files = sink.commit(spec, staging, guard)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finished = time.time()
    sink.write_status(spec, Status.DONE, base=record, finished_at=finished,
                      elapsed=round(elapsed, 4), error=None, metrics=metrics, files=files,
                      history=end_attempt(record, "DONE", finished))
    return {"run_id": spec.run_id, "name": spec.name, "status": Status.DONE.value,
            "metrics": metrics, "worker": worker.name}


def _either(a: Callable[[], str | None], b: Callable[[], str | None]) -> Callable[[], str | None]:
    return lambda: a() or b()


def _also(first: Callable[[dict[str, Any]], None] | None,
          then: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def both(last: dict[str, Any]) -> None:
        then(last)
        if first is not None:
            first(last)
    return both


def progress_interval() -> float:
    """ORCH_PROGRESS_INTERVAL (default 1 s): at most one progress write per run this often,
    however fast the trainer's loop reports."""
    return float(settings.value("ORCH_PROGRESS_INTERVAL"))


def _progress_sender(live: LiveState, spec: RunSpec, worker: WorkerInfo) -> Callable[[dict[str, Any]], None]:
    """A trainer's reports to Redis (`orch:progress`), rate-limited: at most one per
    progress_interval(), the first once the run has trained that long (a run shorter
    than that sends none: a round trip saved where runs are many and short). Redis
    trouble never stops the training."""
    interval = progress_interval()
    last = [time.monotonic()]
    base = {"name": spec.name, "experiment": spec.experiment, "worker": worker.name,
            "gpu": worker.gpu}

    def send(report: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] < interval:
            return
        last[0] = now
        with contextlib.suppress(Exception):
            live.set_progress(spec.run_key, {**base, **report, "t": time.time()})

    return send


def last_attempt(record: dict[str, Any]) -> int:
    """The highest attempt number a fold's record knows of (0: none)."""
    numbers = [h.get("attempt") for h in record.get("history", []) if isinstance(h, dict)]
    numbers.append(record.get("attempt"))
    return max((n for n in numbers if type(n) is int), default=0)


def start_attempt(record: dict[str, Any], attempt: int, worker: WorkerInfo,
                  started: float) -> list[dict[str, Any]]:
    """The fold's attempt history with this attempt added; an earlier attempt that never
    reported an outcome is marked lost (its process or host died)."""
    # Every attempt is kept (bounded against a file that would grow without end: runs
    # are capped at a few retries and lost attempts, so this bound is never reached).
    history = [dict(h) for h in record.get("history", []) if isinstance(h, dict)][-1000:]
    for h in history:
        h.setdefault("outcome", "LOST")
    return [*history, {"attempt": attempt, "worker": worker.name, "host": worker.host,
                       "started_at": started}]


def end_attempt(record: dict[str, Any], outcome: str, finished: float, error: str | None = None,
                attempt: int | None = None, worker: str | None = None) -> list[dict[str, Any]]:
    """The history with the outcome of `attempt` (default: the open one) recorded; an
    attempt that ends before it started training (given up, cancelled) gets its entry."""
    history = [dict(h) for h in record.get("history", []) if isinstance(h, dict)]
    if attempt is not None and attempt > 0 and (not history or history[-1].get("attempt") != attempt):
        for h in history:
            h.setdefault("outcome", "LOST")
        history.append({"attempt": attempt, "worker": worker, "started_at": finished})
    if history and "outcome" not in history[-1]:
        history[-1].update(outcome=outcome, finished_at=finished,
                           **({"error": error} if error else {}))
    return history


def commit_folder(staging: Path, final: Path, run_id: str) -> None:
    """Move the staged folder to its place in one rename. A committed fold of this run is
    never replaced: the rename fails when `final` is a non-empty folder, so of two
    attempts that both passed their fence check (one paused in between), the first
    rename wins and the other's work is discarded. What another run (same folder,
    other content) left there is moved aside first; an attempt of this run that finds
    a damaged fold removes it before it trains (SharedSink.prepare)."""
    if os.path.lexists(final):
        meta = read_json(final / "metadata.json")
        if isinstance(meta, dict) and meta.get("run_id") == run_id:
            raise RunStopped("another attempt committed this run's outputs first")
        move_aside(final, staging.with_name(staging.name + ".old"))
    try:
        os.rename(staging, final)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise RunStopped("another attempt committed this run's outputs first") from None
        raise
    fsync_dir(final.parent)


def move_aside(folder: Path, aside: Path) -> None:
    """Remove `folder`: renamed out of sight first (one step), then deleted."""
    try:
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def clear_staging(layout: Layout, spec: RunSpec, keep: str | None = None) -> None:
    """Remove what earlier attempts of this fold left in the group's staging folder (a
    process killed while writing; a fenced zombie). Only the attempt holding the run
    calls this, so no live attempt's folder goes: a zombie that still writes into its
    own finds it gone and cannot commit anyway. `keep`: this attempt's tag."""
    stage = layout.staging_root(spec)
    try:
        names = os.listdir(stage)
    except FileNotFoundError:
        return
    prefix = f"fold_{spec.fold}."
    for name in names:
        if name.startswith(prefix) and (keep is None or name != prefix + keep):
            shutil.rmtree(stage / name, ignore_errors=True)


def adopt(layout: Layout, spec: RunSpec, meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The DONE record of outputs committed by an attempt that died before writing it
    (metadata.json says which attempt, on which worker)."""
    finished = time.time()
    attempt = meta.get("attempt") if type(meta.get("attempt")) is int else record.get("attempt")
    history = [dict(h) for h in record.get("history", []) if isinstance(h, dict)]
    for h in history:
        if "outcome" not in h:
            h.update(outcome="DONE", finished_at=finished, adopted=True) if h.get("attempt") == attempt \
                else h.update(outcome="LOST")
    return write_fold_status(layout, spec, Status.DONE, base=record, attempt=attempt,
                             worker=meta.get("worker"), host=meta.get("host"), finished_at=finished,
                             error=None, metrics=meta.get("metrics", {}),
                             files=file_sizes(layout.fold_files(spec)), history=history, adopted=True)


def _write_outputs(folder: Path, table: datasets.Table, rows: np.ndarray, n_val: int,
                   probs: np.ndarray, metadata: dict[str, Any]) -> None:
    """The four files of a fold, in a fresh staging folder (durable before the commit)."""
    folder.mkdir(parents=True)
    split_of = ["val"] * n_val + ["holdout"] * (len(rows) - n_val)
    classes = list(table.classes)
    # Plain Python values (tolist) before the per-row loops: 40% less CPU than numpy
    # scalars for a small fold, where this formatting is a good part of a run's cost.
    index = rows.tolist()
    truth = table.y[rows].tolist()
    # Line by line, the bytes table_csv (csv.writer) would write: class names quoted as
    # it quotes them, the other cells (numbers, "val", "holdout") never need it.
    # (finalize writes the ensemble tables the same way).
    cell = csv_cells(classes)
    names = [cell[c] for c in classes]
    header = table_csv(["index", "split", *classes], [])
    probs_text = prob_text(len(classes))
    ranks_text = ("," + ",".join(["{}"] * len(classes))).format
    write_new(folder / "predictions.csv", table_csv(["index", "split", "y_true", "y_pred"], []) + "".join([
        f"{r},{s},{names[t]},{names[p]}\n"
        for r, s, t, p in zip(index, split_of, truth, probs.argmax(axis=1).tolist(), strict=True)]))
    write_new(folder / "probabilities.csv", header + "".join([
        f"{r},{s}{probs_text(*pr)}\n" for r, s, pr in zip(index, split_of, probs.tolist(), strict=True)]))
    write_new(folder / "ranks.csv", header + "".join([
        f"{r},{s}{ranks_text(*rk)}\n" for r, s, rk in zip(index, split_of, ranks(probs).tolist(), strict=True)]))
    write_new(folder / "metadata.json", json_bytes(metadata))
    fsync_folder(folder)


def holds(guard: Guard) -> bool:
    """Whether the attempt may still write the run's records: it holds the run (a
    cancel does not take that away), as Redis says now; False when Redis cannot say."""
    try:
        guard.check()
    except RunStopped as stop:
        return stop.cancelled
    except Exception:
        return False
    return True


def record_failure(spec: RunSpec, layout: Layout, worker: WorkerInfo, attempt: int,
                   exc: BaseException, will_retry: bool, live: LiveState | None = None,
                   status: Status | None = None, sink: Sink | None = None,
                   guard: Guard | None = None) -> str:
    """Mark the fold FAILED (or PENDING when a retry follows, or `status`) in `sink` (by
    default the results root); return the error text. Given the attempt's `guard`,
    only while that attempt still holds the run (asked fresh): a fenced attempt (a
    zombie whose writes failed under it, say) records nothing over its successor's."""
    sink = sink or SharedSink(layout)
    error = f"{type(exc).__name__}: {exc}"
    if guard is not None and not holds(guard):
        return error
    status = status or (Status.PENDING if will_retry else Status.FAILED)
    current = sink.read_status(spec) or {}
    now = time.time()
    sink.write_status(spec, status, base=current, attempt=attempt, worker=worker.name,
                      host=worker.host, finished_at=now, error=error,
                      traceback="".join(traceback.format_exception(exc))[-4000:],
                      history=end_attempt(current, "RETRY" if will_retry else status.value, now, error,
                                          attempt, worker.name))
    if live:
        live.set_run(spec.experiment, spec.run_id, status.value, worker=worker.name,
                     attempt=attempt, error=error)
    return error
