"""One delivery of a run's message, as plain Python: every decision of an attempt.

`tasks.train_run` hands the message here and turns the outcome into Celery (a return,
a retry, a requeue, a raise); nothing here knows Celery. The order of decisions:

1. Refuse a message that is not valid whole (spec, submitted_at, trainer, version,
   params): the reason goes to the dead letters, and nothing that belongs to the run
   is touched (Refused).
2. The experiment's gates and the claim, in one round trip (leases.begin): cancelled
   after the message was sent (CANCELLED, recorded only under a claim), paused (Park),
   or held by another attempt: a pool process of this host that died is taken over at
   once, a live holder is waited for and its outcome reported.
3. GPU admission (HandBack when the GPU lacks memory or a free share).
4. A run that already ended (a duplicate delivery) reports what was recorded.
5. The lost-attempt cap: a run whose process died too often is given up (GiveUp).
6. Training and commit (runner.execute) under the lease's fence; a failure is retried
   with backoff up to `retries`, a CUDA out-of-memory once with the run's `cuda_oom`
   overrides; a fenced attempt (a zombie) writes nothing (HandBack).

A Redis outage (Redis restarting) is not the run's failure: the claim waits for Redis,
and an attempt that met one is retried (a new delivery: claimed and fenced anew) without
counting against `retries`, up to outage.OUTAGE_RETRIES times (orchestrator.outage).

Whatever happens, the attempt's end releases its GPU shares and its lease, with the
log tail and the live DONE mark, in one round trip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import keys
from ..collect.status import Status
from ..errors import DatasetError, InvalidSpecError, RunStopped, UnknownTrainerError
from ..experiment.datasets import open_regular
from ..experiment.spec import RunSpec, check_submitted_at
from ..keys import PROGRESS
from ..livestate import LiveState
from ..outage import OUTAGE_RETRIES, is_outage, wait_for_redis
from ..paths import Layout
from .admission import Need, Shares, worker_gpus
from .deadletters import DeadLetters
from .gang import Gang, GangNotReady, retry_seconds
from .leases import Claim, LeaseGuard, Leases, Start
from .ranks import Send, leading
from .returns import ReturnSink
from .runlogs import LOG_TTL, capture, read_tail
from .runner import (
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
from .transfer import PayloadTooLarge

log = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# A run whose process dies (segfault, OOM kill, lost host) gets max(retries, this) more
# attempts: a host failure is not the run's fault, but a run that kills every worker
# it touches must not loop forever.
LOST_ATTEMPTS_MIN = 2
WAIT_POLL_SECONDS = 1.0  # a duplicate delivery looks at the live holder this often


class RunFailed(Exception):
    """A run that ended FAILED or CANCELLED without (another) attempt: the chord sees a
    failure and its error callback records the group."""


# --- outcomes: what the Celery task does next --------------------------------------------

@dataclass(frozen=True)
class Finished:
    """Return `result` (the run's summary): the chord counts the run."""

    result: dict[str, Any]


@dataclass(frozen=True)
class RetryLater:
    """Send the same message again after `seconds` (same task id, same chord)."""

    seconds: float
    error: BaseException


@dataclass(frozen=True)
class Park:
    """Move the message, unchanged, to `queue` (a paused experiment's parked queue)."""

    queue: str


@dataclass(frozen=True)
class HandBack:
    """Requeue the delivery (if still unacknowledged): another attempt owns the run, or
    this GPU cannot take it now (`gpus` given: the worker stops consuming until the
    GPUs have room)."""

    reason: str
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class GiveUp:
    """Raise `error`: the run ended FAILED or CANCELLED (recorded), or the message was
    refused (`refused`: in the dead letters, nothing of the run touched)."""

    error: BaseException
    refused: bool = False


Outcome = Finished | RetryLater | Park | HandBack | GiveUp


@dataclass(frozen=True)
class Delivery:
    """What the broker says about this delivery (from the Celery request)."""

    task_id: str
    task: str = "tasks.train_run"
    hostname: str = "unknown"
    queue: str | None = None


@dataclass
class Services:
    """What an attempt works with: plain objects, made once per worker process."""

    layout: Layout
    leases: Leases
    live: LiveState
    shares: Shares
    sink: Callable[[], Sink]  # a fresh sink per attempt (return mode: its scratch folder)
    # Exceptions that mean "the run exceeded its timeout" (Celery's soft time limit).
    timeouts: tuple[type[BaseException], ...] = ()
    # Sends a data-parallel run's rank task (queue, kwargs); None: this process cannot.
    send_rank: Send | None = None


def backoff(retries: int) -> float:
    return min(RETRY_BASE_SECONDS * 2**retries, RETRY_MAX_SECONDS)


def refuse(client: Any, delivery: Delivery, exc: BaseException, raw: Any) -> GiveUp:
    """A refused message: its reason in the dead letters (`orchestrator deadletters`),
    never in the run's records."""
    with contextlib.suppress(Exception):
        DeadLetters(client).add(f"{type(exc).__name__}: {exc}", task_id=delivery.task_id,
                                task=delivery.task, queue=delivery.queue,
                                raw=json.dumps(raw, default=repr)[:4096])
    log.warning("refused %s %s: %s", delivery.task, delivery.task_id, exc)
    return GiveUp(exc, refused=True)


def part_of(spec: Any, body: Any) -> bool:
    """Whether a refused message's `spec` is one of the runs its own chord body finalizes
    (the canvas sends the body one spec of the group and its folds): then it is a genuine
    part, refused here (another trainer version, a dataset this host cannot read), and
    the chord must count its failure, or the group would wait forever. A forged copy of
    a running message with its spec changed is not, and counts in no chord."""
    try:
        kwargs = body.get("kwargs") or {}
        args = body.get("args") or ()
        specs: Any = kwargs.get("specs") or (args[0] if args else None)
        folds = kwargs.get("folds")
        first = dict(specs[0])
        fold = spec["fold"]
        return (isinstance(folds, list) and fold in folds and type(fold) is int
                and {**first, "fold": fold} == spec)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):
        return False


def attempt(svc: Services, spec: Any, submitted_at: Any, delivery: Delivery) -> Outcome:
    """One delivery of a train_run message, from its refusal or claim to its end."""
    worker = WorkerInfo.from_env(delivery.hostname)
    try:
        run = RunSpec.from_dict(spec)
        submitted = check_submitted_at(submitted_at)
        runnable(run, worker.device)
        if run.dataset.source == "csv" and run.dataset.path:  # a FIFO, a device: refused
            fh, _ = open_regular(run.dataset.path)
            fh.close()
    except (UnknownTrainerError, InvalidSpecError, DatasetError) as exc:
        return refuse(svc.leases.client, delivery, exc, spec)
    try:
        return _Attempt(svc, run, submitted, delivery, worker).start()
    except Exception as exc:
        # Redis went away outside the training (a duplicate waiting for the holder, GPU
        # admission): delivered again once it answers, not failed (bounded as below).
        if not is_outage(exc) or not wait_for_redis(svc.leases.client):
            raise
        outages = svc.leases.count_outage(run.run_key)
        if outages > OUTAGE_RETRIES:
            raise
        log.warning("%s: Redis did not answer (%s); delivered again", run.name, exc)
        return RetryLater(backoff(outages - 1), exc)


class _Attempt:
    """The state of one delivery between its claim and its end."""

    def __init__(self, svc: Services, run: RunSpec, submitted_at: float | None, delivery: Delivery,
                 worker: WorkerInfo):
        self.svc, self.run, self.submitted_at, self.delivery = svc, run, submitted_at, delivery
        self.worker, self.sink = worker, svc.sink()
        self.info = {"worker": worker.name, "host": worker.host, "pid": os.getpid(), "name": run.name,
                     "experiment": run.experiment, "task_id": delivery.task_id, "started": time.time(),
                     "queue": delivery.queue}

    def failed(self, claim: Claim, exc: BaseException, guard: LeaseGuard | None,
               will_retry: bool = False, status: Status | None = None) -> str:
        return record_failure(self.run, self.svc.layout, self.worker, claim.attempt, exc,
                              will_retry=will_retry, live=self.svc.live, status=status,
                              sink=self.sink, guard=guard)

    def start(self) -> Outcome:
        run, svc = self.run, self.svc
        # The live IN_PROGRESS mark goes with the claim (one round trip), except where GPU
        # admission may still hand the run back: there execute() sets it once admitted.
        mark = not (self.worker.device == "cuda" and run.resources.gpus > 0)
        entry = svc.live.run_entry(run.experiment, run.run_id, Status.IN_PROGRESS.value,
                                   worker=self.worker.name) if mark else None
        begun = self.begin(entry)
        if begun.cancelled_at is not None:
            return self.cancelled_before_start()
        if begun.paused:  # park it, same message and chord, until resumed
            return Park(keys.parked_queue(run.experiment))
        claim = begun.claim or self.wait_for_holder(begun.holder or {})
        if not isinstance(claim, Claim):
            return self.reported(self.settled() or {})
        gpus, why = self.take_gpus(claim)
        if why is not None:
            return HandBack(why, tuple(gpus))
        try:
            return self.train(claim, gpus, mark)
        finally:
            with contextlib.suppress(Exception):
                if gpus:
                    svc.shares.release(self.worker.host, gpus, run.run_key)
            if isinstance(self.sink, ReturnSink):
                self.sink.cleanup()  # its scratch folder (created only once the run started)

    def begin(self, entry: tuple[str, str, str, int] | None) -> Start:
        """leases.begin, waiting out a Redis outage (up to OUTAGE_RETRIES of them, each up
        to OUTAGE_WAIT_SECONDS): a delivery that meets Redis restarting has not failed."""
        run, leases = self.run, self.svc.leases
        for tries in range(OUTAGE_RETRIES + 1):
            try:
                return leases.begin(run.run_key, self.info, run.experiment, self.submitted_at,
                                    self.delivery.task_id, entry)
            except Exception as exc:
                if not is_outage(exc) or tries == OUTAGE_RETRIES or not wait_for_redis(leases.client):
                    raise
                log.warning("%s: Redis did not answer the claim (%s); asking again", run.name, exc)
        raise AssertionError("unreachable")

    def train(self, claim: Claim, gpus: list[int], mark: bool) -> Outcome:
        run, svc, worker = self.run, self.svc, self.worker
        if len(worker_gpus()) > 1 and gpus:  # a multi-GPU worker: the run sees only its GPUs
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
            worker = self.worker = dataclasses.replace(worker, gpu=os.environ["CUDA_VISIBLE_DEVICES"])
        guard: LeaseGuard | None = None
        log_path = None
        committed = done = False
        try:
            found = self.sink.fold_state(run, self.submitted_at)  # one read, for both checks
            if (record := self.settled(found)) is not None:
                done = record.get("status") == Status.DONE.value
                if mark and not done:  # the live state said IN_PROGRESS since begin
                    svc.live.set_run(run.experiment, run.run_id, str(record.get("status")),
                                     worker=record.get("worker"), attempt=record.get("attempt"),
                                     error=record.get("error"))
                return self.reported(record)
            # Attempt numbers keep counting past what the run's records say (local mode
            # starts a new Redis for each command): no log or history entry is reused.
            claim = svc.leases.renumber(run.run_key, claim, last_attempt(found[1]))
            guard = LeaseGuard(svc.leases, run.run_key, claim, self.info, run.experiment,
                               self.submitted_at)
            lost_limit = max(run.retries, LOST_ATTEMPTS_MIN)
            if claim.lost > lost_limit:
                why = RunFailed(f"its process died {claim.lost} times without finishing (segfault, "
                                f"OOM kill or lost host); gave up after {lost_limit} retries")
                self.failed(claim, why, guard)
                return GiveUp(why)
            gang: Gang | None = None
            with guard:
                if run.resources.ranks > 1:  # a data-parallel run: reserve its gang first
                    gang = Gang(svc.leases.client, run, claim.attempt)
                    if svc.send_rank is None:
                        raise GangNotReady("this process cannot send rank tasks")
                    workers = gang.reserve(worker.name, worker.device)
                log_path = self.sink.run_log(run, claim.attempt)
                after_oom = worker.device == "cuda" and bool(svc.leases.attempts(run.run_key).get("oom"))
                with capture(log_path):
                    if gang is None:
                        result = execute(run, svc.layout, worker, claim.attempt, svc.live, guard,
                                         lost=claim.lost, after_oom=after_oom, sink=self.sink, found=found,
                                         marked=mark)
                    else:
                        assert svc.send_rank is not None
                        point = svc.layout.checkpoint(run) if isinstance(self.sink, SharedSink) else None
                        with leading(gang, workers, worker, svc.send_rank, point,
                                     lambda: guard.check(fresh=False)) as (dist, watch):
                            result = execute(run, svc.layout, worker, claim.attempt, svc.live, guard,
                                             lost=claim.lost, after_oom=after_oom, sink=self.sink,
                                             found=found, marked=mark, dist=dist, watch=watch)
                committed, done = not result.get("skipped") or bool(result.get("adopted")), True
                return Finished(result)
        except RunStopped as stop:
            if stop.cancelled:
                error = RunFailed(str(stop))
                self.failed(claim, error, guard, status=Status.CANCELLED)
                return GiveUp(error)
            # A zombie, or handed back by a warm stop: another attempt owns the run now.
            # Write nothing, report nothing (the chord counts that attempt).
            log.warning("%s: attempt %d stops without writing: %s", run.name, claim.attempt, stop)
            return HandBack(str(stop))
        except GangNotReady as exc:  # nothing trained, nothing held: try again later
            log.warning("%s: attempt %d waits for its gang: %s", run.name, claim.attempt, exc)
            return RetryLater(retry_seconds(), exc)
        except (UnknownTrainerError, InvalidSpecError, PayloadTooLarge) as exc:  # retrying cannot help
            self.failed(claim, exc, guard)
            return GiveUp(exc)
        except svc.timeouts:
            timeout = TimeoutError(f"run exceeded its timeout of {run.timeout:g} s")
            self.failed(claim, timeout, guard)
            return GiveUp(timeout)
        except Exception as exc:
            return self.after_exception(claim, guard, exc)
        finally:
            tail = read_tail(log_path) if log_path is not None else None
            done_entry = (svc.live.run_entry(run.experiment, run.run_id, Status.DONE.value,
                                             worker=worker.name, attempt=claim.attempt) if done else None)
            with contextlib.suppress(Exception):  # a stale token releases nothing
                svc.leases.finish(run.run_key, claim.token, committed, PROGRESS,
                                  (keys.log(run.run_key, claim.attempt), tail, LOG_TTL) if tail else None,
                                  done_entry)

    def after_exception(self, claim: Claim, guard: LeaseGuard | None, exc: Exception) -> Outcome:
        """The trainer (or a write) raised: retried with backoff up to `retries` times,
        CUDA out-of-memory once with the run's `cuda_oom` overrides, else FAILED; a Redis
        outage is not counted (after_outage)."""
        run, leases = self.run, self.svc.leases
        if is_outage(exc) and (outcome := self.after_outage(claim, guard, exc)) is not None:
            return outcome
        if guard is not None and not holds(guard):  # fenced: not the run's failure (a zombie's)
            log.warning("%s: attempt %d stops without writing: %s", run.name, claim.attempt, exc)
            return HandBack(f"fenced attempt failed: {exc}")
        if self.worker.device == "cuda" and is_cuda_oom(exc):
            return self.out_of_memory(claim, guard, exc)
        failures = leases.count_failure(run.run_key)
        will_retry = failures <= run.retries
        self.failed(claim, exc, guard, will_retry=will_retry)
        if will_retry:
            log.warning("%s: attempt %d failed (%s); retrying", run.name, claim.attempt, exc)
            return RetryLater(backoff(failures - 1), exc)
        return GiveUp(exc)

    def after_outage(self, claim: Claim, guard: LeaseGuard | None, exc: Exception) -> Outcome | None:
        """Redis did not answer during the attempt (restarting, say): not the run's
        failure. Once Redis answers again: handed back if another attempt holds the run
        now (the watchdog gave it on), else recorded PENDING and retried with backoff: a
        new delivery, claimed and fenced like any. None after OUTAGE_RETRIES outages of
        this run: then it counts as its failure. Redis still silent after
        OUTAGE_WAIT_SECONDS: retried, nothing recorded (nothing can be)."""
        run, leases = self.run, self.svc.leases
        if not wait_for_redis(leases.client):
            log.warning("%s: attempt %d met a Redis outage (%s) that has not ended; retrying",
                        run.name, claim.attempt, exc)
            return RetryLater(backoff(0), exc)
        guard = guard or LeaseGuard(leases, run.run_key, claim, self.info, run.experiment, self.submitted_at)
        if not holds(guard):
            log.warning("%s: attempt %d met a Redis outage (%s) and lost the run", run.name, claim.attempt, exc)
            return HandBack(f"Redis outage, then fenced: {exc}")
        outages = leases.count_outage(run.run_key)
        if outages > OUTAGE_RETRIES:
            return None
        self.failed(claim, exc, guard, will_retry=True)
        log.warning("%s: attempt %d met a Redis outage (%s); retrying (not counted against its retries)",
                    run.name, claim.attempt, exc)
        return RetryLater(backoff(outages - 1), exc)

    def out_of_memory(self, claim: Claim, guard: LeaseGuard | None, exc: Exception) -> Outcome:
        """CUDA ran out of memory although admission saw enough free: retry once with the
        run's `cuda_oom` overrides (a smaller batch, say) if it has them and has not used
        them yet, else FAILED saying so."""
        run, leases = self.run, self.svc.leases
        used = bool(leases.attempts(run.run_key).get("oom"))
        if run.overrides.get("cuda_oom") and not used:
            leases.client.hset(keys.attempts(run.run_key), "oom", "1")
            self.failed(claim, exc, guard, will_retry=True)
            log.warning("%s: CUDA out of memory; retrying with its cuda_oom overrides %s", run.name,
                        dict(run.overrides["cuda_oom"]))
            return RetryLater(1.0, exc)
        hint = ("even with its cuda_oom overrides" if used else
                "and it has no cuda_oom overrides to retry with (add e.g. `cuda_oom: {batch_size: 32}`)")
        failed = RunFailed(f"CUDA out of memory on GPU {self.worker.gpu}, {hint}: {exc}")
        self.failed(claim, failed, guard)
        return GiveUp(failed)

    def cancelled_before_start(self) -> Outcome:
        """Its experiment was cancelled after this message was sent: CANCELLED, recorded
        only by a delivery that can claim the run (no other attempt holds it) and only
        over a record that has not ended (a duplicate of a finished run changes nothing)."""
        why = RunFailed("cancelled: its experiment was cancelled (orchestrator cancel) before it started")
        got = self.svc.leases.claim(self.run.run_key, self.info)
        if isinstance(got, Claim):
            try:
                if self.settled() is None:
                    self.failed(got, why, None, status=Status.CANCELLED)
            finally:
                self.svc.leases.finish(self.run.run_key, got.token, False, PROGRESS, None)
        return GiveUp(why)

    def wait_for_holder(self, holder: dict[str, Any]) -> Claim | None:
        """Another attempt holds the lease: take over at once when that attempt was a pool
        process of this host that died (the retry after a SIGKILL); else wait until it
        ends (this delivery is a duplicate: a redelivery, or a re-dispatch after Redis
        lost its state), then report what it recorded (None), or take over if it lapses."""
        leases, run, task_id = self.svc.leases, self.run, self.delivery.task_id
        got: Claim | dict[str, Any] = holder
        while not isinstance(got, Claim):
            token = got.get("token")
            if (token and got.get("host") == self.worker.host and got.get("pid")
                    and not _pid_alive(got["pid"])):
                leases.revoke(run.run_key, token, why="its process died")
                got = leases.claim(run.run_key, self.info)
                continue
            state, _ = self.sink.fold_state(run, self.submitted_at)
            if state == Status.DONE.value:
                leases.wait_mark(task_id, done=True)
                return None
            leases.wait_mark(task_id)
            time.sleep(WAIT_POLL_SECONDS)
            got = leases.claim(run.run_key, self.info)
        leases.wait_mark(task_id, done=True)
        return got

    def take_gpus(self, claim: Claim) -> tuple[list[int], str | None]:
        """On a GPU worker: the GPUs this run gets (free memory and share checked, shares
        taken); else (the GPUs, why not): its lease is released and the worker is marked
        waiting until its GPUs have room (the task stops consuming: tasks/admission.py)."""
        run, worker = self.run, self.worker
        mine = worker_gpus() if worker.device == "cuda" and run.resources.gpus > 0 else []
        if not mine:
            return [], None
        need = Need.of(run)
        taken, why = self.svc.shares.take(worker.host, mine, run.run_key, need)
        if taken:
            return taken, None
        self.svc.leases.release(run.run_key, claim.token)
        if need.count > len(mine):
            why = f"it needs {need.count} GPUs of one host, this worker has {len(mine)}"
        self.svc.shares.start_waiting(worker.name, mine, need, why)
        log.warning("%s: not starting on GPU %s (%s); handed back, waiting for the GPU",
                    run.name, ",".join(map(str, mine)), why)
        return mine, f"GPU not available: {why}"

    def settled(self, found: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The fold's record if it already ended after this message was submitted: this
        delivery is a duplicate of an attempt that finished (DONE, FAILED or CANCELLED).
        `found`: the fold's state as the caller just read it."""
        state, record = found or self.sink.fold_state(self.run, self.submitted_at)
        if state == Status.DONE.value:
            return record
        if (self.submitted_at is not None and state in (Status.FAILED.value, Status.CANCELLED.value)
                and float(record.get("updated_at", 0)) > self.submitted_at):
            return record
        return None

    def reported(self, record: dict[str, Any]) -> Outcome:
        """What a duplicate delivery reports: the recorded outcome of the attempt that ran."""
        if record.get("status") == Status.DONE.value:
            return Finished({**self.sink.summary(self.run, record), "skipped": True})
        return GiveUp(RunFailed(str(record.get("error") or f"{self.run.name} ended {record.get('status')}")))


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True
