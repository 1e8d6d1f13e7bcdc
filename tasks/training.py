"""Thin Celery tasks: decode the spec, call plain Python, record the outcome.

Everything they receive comes from the broker and is treated as untrusted: specs are
parsed strictly (orchestrator.spec), trainers must be registered on this worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from celery.signals import worker_init

from orchestrator.admission import Need, Shares, worker_gpus
from orchestrator.errors import InvalidSpecError, RunStopped, UnknownTrainerError
from orchestrator.finalize import (
    FoldStates,
    finalize_group,
    fold_states,
    group_paths,
    mark_group_failed,
)
from orchestrator.leases import Claim, LeaseGuard, Leases, attempts_key, parked_queue
from orchestrator.livestate import PROGRESS, LiveState
from orchestrator.paths import Layout
from orchestrator.returns import Returns, ReturnSink, collect
from orchestrator.runlogs import LOG_TTL, capture, log_key, read_tail
from orchestrator.runner import (
    SharedSink,
    Sink,
    WorkerInfo,
    execute,
    holds,
    is_cuda_oom,
    last_attempt,
    record_failure,
    runnable,
)
from orchestrator.spec import RunSpec

try:  # TEMP until the helpers land
    from orchestrator.spec import check_submitted_at
except ImportError:
    def check_submitted_at(value: Any) -> Any:
        return value
try:
    from orchestrator.deadletters import DeadLetters
except ImportError:
    DeadLetters = None

from orchestrator.status import FoldPaths, Status
from orchestrator.trainers import get_trainer, registry
from orchestrator.transfer import RETURN, PayloadTooLarge

from . import app
from .admission import stop_consuming

log = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# A run whose process dies (segfault, OOM kill, lost host) gets max(retries, this) more
# attempts: a host failure is not the run's fault, but a run that kills every worker
# it touches must not loop forever.
LOST_ATTEMPTS_MIN = 2


@functools.cache
def _layout() -> Layout:
    return Layout(app.conf.orch_results_root)


@functools.cache
def _leases() -> Leases:
    return Leases.from_url(app.conf.orch_state_url)


@functools.cache
def _shares() -> Shares:
    return Shares(_leases().client)


@functools.cache
def _returns() -> Returns:
    return Returns(_leases().client, ttl=app.conf.result_expires)


def _sink() -> SharedSink | ReturnSink:
    """Where this worker's runs go (ORCH_RESULTS_TRANSFER): the shared results root, or
    back through Redis to the control worker (a fresh scratch folder per task)."""
    if app.conf.orch_results_transfer == RETURN:
        return ReturnSink(_returns(), app.conf.orch_return_max_bytes, app.conf.orch_scratch_dir)
    return SharedSink(_layout())


def _collect(group: list[RunSpec], paths: list[FoldPaths] | None = None) -> FoldStates:
    """Control side: what return-mode workers left in Redis, under the results root.
    Returns each fold's state and record as they are on disk now (one read of each
    status file when there was nothing to collect: the shared-root case). `paths`:
    orchestrator.finalize.group_paths of the group, if the caller has them."""
    layout = _layout()
    states = fold_states(layout, group, paths)
    if collect(layout, group, _returns(), app.conf.orch_return_max_bytes, states):
        states = fold_states(layout, group, paths)  # it wrote something: read them again
    return states


@functools.cache
def _live() -> LiveState:
    # Created lazily, in the process that uses it (never shared across a fork).
    return LiveState.from_url(app.conf.orch_state_url)


def _specs(specs: Any, folds: Any = None) -> list[RunSpec]:
    """The group's specs, parsed strictly (RunSpec.from_dict). As the canvas sends them
    (`folds` given): one spec, and the folds of the group, which differ from it in their
    fold alone. Else (older messages, direct calls): every fold's spec."""
    if not isinstance(specs, list) or not specs:
        raise InvalidSpecError("specs must be a non-empty list of run specs")
    if folds is not None:
        if len(specs) != 1:
            raise InvalidSpecError("with folds, specs must be a list of one run spec")
        first = RunSpec.from_dict(specs[0])
        if (not isinstance(folds, list) or not folds
                or not all(type(f) is int and 0 <= f < first.n_folds for f in folds)
                or len(set(folds)) != len(folds)):
            raise InvalidSpecError(f"folds must be a non-empty list of distinct fold numbers "
                                   f"0..{first.n_folds - 1}, got {folds!r}")
        return [dataclasses.replace(first, fold=f) for f in folds]
    parsed = [RunSpec.from_dict(data) for data in specs]
    if len({s.group_id for s in parsed}) != 1:
        raise InvalidSpecError("specs of one group must share their group_id")
    return parsed


def _group(task: Any, specs: Any, folds: Any) -> list[RunSpec]:
    """A group callback's specs, refused (dead letters, FAILURE, nothing written) unless
    they parse strictly and name a trainer registered here: the control worker runs the
    same installation as the training workers."""
    try:
        group = _specs(specs, folds)
        get_trainer(group[0].trainer)
    except (UnknownTrainerError, InvalidSpecError) as exc:
        _refuse(task, exc, {"specs": specs, "folds": folds})
        raise
    return group


@worker_init.connect
def _preload_in_parent(**_: Any) -> None:
    """In the worker's main process, before the pool forks, so every pool child starts
    with these modules loaded: scikit-learn's splitters (~1 s otherwise), its dataset
    loaders and its first-use work (~55 ms of a pool process's first run), and on
    training workers (`orchestrator worker --gpu/--cpu` set ORCH_PRELOAD=1) each
    trainer's imports. Training workers fork a fresh child per run on GPUs
    (--max-tasks-per-child 1), and `import torch` took 3.5 s of every run's start on an
    H100 host when it ran in the child. Trainer preloads import only: CUDA stays
    uninitialised in this process (design invariant 5). (Not at import time:
    `orchestrator submit` imports this module and needs none of it.)"""
    from orchestrator.datasets import warm_up

    warm_up()  # scikit-learn's imports and first-use work (orchestrator.datasets)

    if os.environ.get("ORCH_PRELOAD") != "1":
        return
    for trainer in registry().values():
        if trainer.preload is not None:
            try:
                trainer.preload()
            except Exception:  # a failed warm-up only costs time later
                log.exception("preloading trainer %s failed", trainer.name)


def backoff(retries: int) -> float:
    return min(RETRY_BASE_SECONDS * 2**retries, RETRY_MAX_SECONDS)


class RunFailed(Exception):
    """A run that ended FAILED or CANCELLED without (another) attempt: the chord sees a
    failure and its error callback records the group."""


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _claim(task: Any, run: RunSpec, worker: WorkerInfo, info: dict[str, Any], sink: Sink,
           submitted_at: float | None, got: Claim | dict[str, Any]) -> Claim | dict[str, Any]:
    """`got` is what the first claim found. If another attempt holds the lease: take over
    at once when that attempt was a pool process of this host that died (the retry after
    a SIGKILL); else wait until it ends (this delivery is a duplicate: a redelivery, or a
    re-dispatch after Redis lost its state) and then report what it recorded, or take
    over if it lapses."""
    leases = _leases()
    while not isinstance(got, Claim):
        holder = got
        token = holder.get("token")
        if (token and holder.get("host") == worker.host and holder.get("pid")
                and not _pid_alive(holder["pid"])):
            leases.revoke(run.run_key, token, why="its process died")
            got = leases.claim(run.run_key, info)
            continue
        state, _ = sink.fold_state(run, submitted_at)
        if state == Status.DONE.value:
            leases.wait_mark(task.request.id, done=True)
            return {"done": True}
        leases.wait_mark(task.request.id)
        time.sleep(1.0)
        got = leases.claim(run.run_key, info)
    leases.wait_mark(task.request.id, done=True)
    return got


def _settled(run: RunSpec, submitted_at: float | None, sink: Sink,
             found: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The fold's record if it already ended after this message was submitted: this
    delivery is a duplicate of an attempt that finished (DONE, FAILED or CANCELLED).
    `found`: the fold's state as the caller just read it."""
    state, record = found or sink.fold_state(run, submitted_at)
    if state == Status.DONE.value:
        return record
    if (submitted_at is not None and state in (Status.FAILED.value, Status.CANCELLED.value)
            and float(record.get("updated_at", 0)) > submitted_at):
        return record
    return None


# ignore_result: a run's outcome lives in its status file and the live state; nothing
# reads its Celery result. Storing it cost a GET, a SET and a PUBLISH per run (~0.14 ms of
# worker CPU), and ~1 KB of Redis memory per run (the spec, with result_extended) kept
# for result_expires (7 days). The chord still counts the run (Celery hands the result to
# the chord whether it is stored or not, once per task id), and a failure is still
# stored, for whoever looks up a refused message.
@app.task(name="tasks.train_run", bind=True, max_retries=None, default_retry_delay=1,
          ignore_result=True, store_errors_even_if_ignored=True)
def train_run(self: Any, spec: dict[str, Any], submitted_at: float | None = None) -> dict[str, Any]:
    """Train one run (one fold of one parameter point) on this worker's device, holding
    its lease (orchestrator.leases) from start to end.

    The message is validated whole before the run is claimed: a refused one (its spec,
    its trainer, its params) is recorded in the dead letters and ends FAILURE, and
    changes nothing that belongs to the run. Only an attempt that claimed the run's
    lease writes its records, and only while it still holds it."""
    worker = WorkerInfo.from_env(self.request.hostname or "unknown")
    try:
        run = RunSpec.from_dict(spec)
        submitted_at = check_submitted_at(submitted_at)
        runnable(run, worker.device)
    except (UnknownTrainerError, InvalidSpecError) as exc:
        _refuse(self, exc, spec)
        raise
    layout, live, leases, sink = _layout(), _live(), _leases(), _sink()
    guard_info = {"worker": worker.name, "host": worker.host, "pid": os.getpid(),
                  "name": run.name, "experiment": run.experiment, "task_id": self.request.id,
                  "started": time.time(), "queue": (self.request.delivery_info or {}).get("routing_key")}
    # The live IN_PROGRESS mark goes with the claim (one round trip), except where GPU
    # admission may still hand the run back: there execute() sets it once admitted.
    mark = not (worker.device == "cuda" and run.resources.gpus > 0)
    entry = live.run_entry(run.experiment, run.run_id, Status.IN_PROGRESS.value,
                           worker=worker.name) if mark else None
    start = leases.begin(run.run_key, guard_info, run.experiment, submitted_at, self.request.id,
                         entry)
    if start.cancelled_at is not None:
        _cancelled_before_start(run, worker, guard_info, submitted_at, sink)
    if start.paused:  # park it, same message and chord, until resumed
        raise self.retry(queue=parked_queue(run.experiment), countdown=0, max_retries=None)
    claim = start.claim or _claim(self, run, worker, guard_info, sink, submitted_at, start.holder or {})
    log_path = None
    committed = done = False
    if not isinstance(claim, Claim):
        return _outcome(run, _settled(run, submitted_at, sink) or {}, sink)
    gpus = _take_gpus(self, run, worker, claim)
    if len(worker_gpus()) > 1 and gpus:  # a multi-GPU worker: the run sees only its GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        worker = dataclasses.replace(worker, gpu=os.environ["CUDA_VISIBLE_DEVICES"])
    guard = LeaseGuard(leases, run.run_key, claim, guard_info, run.experiment, submitted_at)
    try:
        found = sink.fold_state(run, submitted_at)  # one read, for both checks
        if (record := _settled(run, submitted_at, sink, found)) is not None:
            done = record.get("status") == Status.DONE.value
            if mark and not done:  # the live state said IN_PROGRESS since begin
                live.set_run(run.experiment, run.run_id, str(record.get("status")),
                             worker=record.get("worker"), attempt=record.get("attempt"),
                             error=record.get("error"))
            return _outcome(run, record, sink)
        # Attempt numbers keep counting past what the run's records say (local mode
        # starts a new Redis for each command): no log or history entry is reused.
        claim = leases.renumber(run.run_key, claim, last_attempt(found[1]))
        guard = LeaseGuard(leases, run.run_key, claim, guard_info, run.experiment, submitted_at)
        lost_limit = max(run.retries, LOST_ATTEMPTS_MIN)
        if claim.lost > lost_limit:
            why = (f"its process died {claim.lost} times without finishing (segfault, OOM "
                   f"kill or lost host); gave up after {lost_limit} retries")
            record_failure(run, layout, worker, claim.attempt, RunFailed(why), will_retry=False,
                           live=live, sink=sink, guard=guard)
            raise RunFailed(why)
        log_path = sink.run_log(run, claim.attempt)
        with guard:
            try:
                after_oom = worker.device == "cuda" and bool(leases.attempts(run.run_key).get("oom"))
                with capture(log_path):
                    result = execute(run, layout, worker, claim.attempt, live, guard,
                                     lost=claim.lost, after_oom=after_oom, sink=sink, found=found,
                                     marked=mark)
                committed, done = not result.get("skipped") or bool(result.get("adopted")), True
                return result
            except RunStopped as stop:
                if stop.cancelled:
                    record_failure(run, layout, worker, claim.attempt, RunFailed(str(stop)),
                                   will_retry=False, live=live, status=Status.CANCELLED, sink=sink,
                                   guard=guard)
                    raise RunFailed(str(stop)) from None
                # A zombie, or handed back by a warm stop: another attempt owns the run
                # now. Write nothing, report nothing (the chord counts that attempt);
                # requeue this delivery if it is still unacknowledged (a warm stop that
                # got here before Celery stopped the process), else it is a no-op.
                log.warning("%s: attempt %d stops without writing: %s", run.name, claim.attempt, stop)
                raise Reject(str(stop), requeue=True) from None
    except (UnknownTrainerError, InvalidSpecError, PayloadTooLarge) as exc:  # retrying cannot help
        record_failure(run, layout, worker, claim.attempt, exc, will_retry=False, live=live, sink=sink,
                       guard=guard)
        raise
    except SoftTimeLimitExceeded:
        timeout = TimeoutError(f"run exceeded its timeout of {run.timeout:g} s")
        record_failure(run, layout, worker, claim.attempt, timeout, will_retry=False, live=live,
                       sink=sink, guard=guard)
        raise timeout from None
    except (Reject, RunFailed, Retry):
        raise
    except Exception as exc:
        if not holds(guard):  # fenced: its failure is not the run's (a zombie's writes failed)
            log.warning("%s: attempt %d stops without writing: %s", run.name, claim.attempt, exc)
            raise Reject(f"fenced attempt failed: {exc}", requeue=True) from None
        if worker.device == "cuda" and is_cuda_oom(exc):
            _out_of_memory(self, run, layout, worker, claim.attempt, exc, live, sink, guard)
        failures = leases.count_failure(run.run_key)
        will_retry = failures <= run.retries
        record_failure(run, layout, worker, claim.attempt, exc, will_retry=will_retry, live=live,
                       sink=sink, guard=guard)
        if will_retry:
            log.warning("%s: attempt %d failed (%s); retrying", run.name, claim.attempt, exc)
            raise self.retry(exc=exc, countdown=backoff(failures - 1), max_retries=None) from exc
        raise
    finally:
        with contextlib.suppress(Exception):
            if gpus:
                _shares().release(worker.host, gpus, run.run_key)
        tail = read_tail(log_path) if log_path is not None else None
        done_entry = (live.run_entry(run.experiment, run.run_id, Status.DONE.value,
                                     worker=worker.name, attempt=claim.attempt) if done else None)
        with contextlib.suppress(Exception):  # a stale token releases nothing
            leases.finish(run.run_key, claim.token, committed, PROGRESS,
                          (log_key(run.run_key, claim.attempt), tail, LOG_TTL) if tail else None,
                          done_entry)
        if isinstance(sink, ReturnSink):
            sink.cleanup()  # its scratch folder (created only once the run started)


def _refuse(task: Any, exc: BaseException, raw: Any) -> None:
    """A refused message: its reason in the dead letters (`orchestrator deadletters`),
    never in the run's records. The task then ends FAILURE (acknowledged, not retried)."""
    request = task.request
    with contextlib.suppress(Exception):
        DeadLetters(_leases().client).add(
            f"{type(exc).__name__}: {exc}", task_id=request.id, task=task.name,
            queue=(request.delivery_info or {}).get("routing_key"),
            raw=json.dumps(raw, default=repr)[:4096])
    log.warning("refused %s %s: %s", task.name, request.id, exc)


def _cancelled_before_start(run: RunSpec, worker: WorkerInfo, info: dict[str, Any],
                            submitted_at: float | None, sink: Sink) -> None:
    """Its experiment was cancelled after this message was sent: CANCELLED, recorded
    only by a delivery that can claim the run (no other attempt holds it) and only over
    a record that has not ended (a duplicate of a finished run changes nothing)."""
    why = "cancelled: its experiment was cancelled (orchestrator cancel) before it started"
    leases = _leases()
    got = leases.claim(run.run_key, info)
    if isinstance(got, Claim):
        try:
            if _settled(run, submitted_at, sink) is None:
                record_failure(run, _layout(), worker, got.attempt, RunFailed(why), will_retry=False,
                               live=_live(), status=Status.CANCELLED, sink=sink)
        finally:
            leases.finish(run.run_key, got.token, False, PROGRESS, None)
    raise RunFailed(why)


def _out_of_memory(task: Any, run: RunSpec, layout: Layout, worker: WorkerInfo, attempt: int,
                   exc: BaseException, live: LiveState, sink: Sink, guard: LeaseGuard) -> None:
    """CUDA ran out of memory although admission saw enough free: retry once with the
    run's `cuda_oom` overrides (a smaller batch, say) if it has them and has not used
    them yet, else FAILED saying so. Always raises."""
    leases = _leases()
    used = bool(leases.attempts(run.run_key).get("oom"))
    if run.overrides.get("cuda_oom") and not used:
        leases.client.hset(attempts_key(run.run_key), "oom", "1")
        record_failure(run, layout, worker, attempt, exc, will_retry=True, live=live, sink=sink,
                       guard=guard)
        log.warning("%s: CUDA out of memory; retrying with its cuda_oom overrides %s", run.name,
                    dict(run.overrides["cuda_oom"]))
        raise task.retry(exc=exc, countdown=1, max_retries=None) from exc
    hint = ("even with its cuda_oom overrides" if used else
            "and it has no cuda_oom overrides to retry with (add e.g. `cuda_oom: {batch_size: 32}`)")
    failed = RunFailed(f"CUDA out of memory on GPU {worker.gpu}, {hint}: {exc}")
    record_failure(run, layout, worker, attempt, failed, will_retry=False, live=live, sink=sink,
                   guard=guard)
    raise failed from exc


def _take_gpus(task: Any, run: RunSpec, worker: WorkerInfo, claim: Claim) -> list[int]:
    """On a GPU worker: the GPUs this run gets (free memory and share checked, shares
    taken); else its lease is released, the run handed back (Reject) and this worker
    waits until its GPUs have room (tasks/admission.py)."""
    mine = worker_gpus() if worker.device == "cuda" and run.resources.gpus > 0 else []
    if not mine:
        return []
    need = Need.of(run)
    taken, why = _shares().take(worker.host, mine, run.run_key, need)
    if not taken:
        _leases().release(run.run_key, claim.token)
        if need.count > len(mine):
            why = f"it needs {need.count} GPUs of one host, this worker has {len(mine)}"
        _hand_back(task, run, worker, mine, why)
    return taken


def _hand_back(task: Any, run: RunSpec, worker: WorkerInfo, gpus: list[int], why: str) -> None:
    _shares().start_waiting(worker.name, gpus, Need.of(run), why)
    stop_consuming(worker.name)
    log.warning("%s: not starting on GPU %s (%s); handed back, waiting for the GPU",
                run.name, ",".join(map(str, gpus)), why)
    raise Reject(f"GPU not available: {why}", requeue=True)


def _outcome(run: RunSpec, record: dict[str, Any], sink: Sink) -> dict[str, Any]:
    """What a duplicate delivery reports: the recorded outcome of the attempt that ran."""
    state = record.get("status")
    if state == Status.DONE.value:
        return {**sink.summary(run, record), "skipped": True}
    raise RunFailed(str(record.get("error") or f"{run.name} ended {state}"))


@app.task(name="tasks.finalize", bind=True)
def finalize(self: Any, results: Any, specs: list[dict[str, Any]],
             folds: list[int] | None = None) -> dict[str, Any]:
    """Chord body: ensemble outputs, final_results.csv rows, status.json DONE. (`specs`
    and `folds`: see _specs.)"""
    group = _group(self, specs, folds)
    _live().count_finalize(group[0].group_id)
    try:
        paths = group_paths(_layout(), group)  # built once, for collect and finalize
        states = _collect(group, paths)
        record = finalize_group(_layout(), group, _live(), states, paths)
    except Exception as exc:
        # Recorded here, with its reason: the chord error callback only learns a task id.
        mark_group_failed(_layout(), group, reason=f"{type(exc).__name__}: {exc}", live=_live())
        raise
    return {"group_id": record["group_id"], "train_status": record["train_status"]}


@app.task(name="tasks.group_failed", bind=True)
def group_failed(self: Any, task_id: str, specs: list[dict[str, Any]],
                 folds: list[int] | None = None) -> dict[str, Any]:
    """Chord error callback: status.json FAILED with which folds failed and why."""
    group = _group(self, specs, folds)
    states = None
    try:  # the folds that did finish count, and the errors of those that did not
        states = _collect(group)
    except Exception:
        log.exception("%s: collecting returned outputs failed", group[0].group_name)
    record = mark_group_failed(_layout(), group, live=_live(), states=states)
    return {"group_id": record["group_id"], "train_status": record["train_status"],
            "failed": record["failed"]}
