"""One attempt of one role instance, as plain Python (tasks/roles.py says it to Celery).

An instance holds a lease like a run (orchestrator.execution.leases, run key
`role.<exp>.<role>.<i>`), renewed by the process's renewal thread, with the task id in
the `active` entry: when the lease lapses (SIGKILL, a host cut, SIGSTOP) the watchdog
hands its unacknowledged message on to another worker, which claims the next attempt.
The attempt's token fences it: a zombie learner's publish fails the token check in the
pointer flip (orchestrator.roles.weights) and nothing of it becomes visible.

The role function gets a RoleContext: its settings for this device, the weight store,
the experience stream, and `running()` (False once the attempt is fenced, the
experiment cancelled, or ended by the learner's step budget), `wait_unpaused()` (actors
produce nothing while `orchestrator pause` holds), `beat(...)` (heartbeat with state
and throughput, for `status`/`watch`), `publish(...)` and `end(...)` for the learner,
`record_eval(...)` for evaluators (orchestrator.roles.evaluation.evaluate_each).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from .. import keys
from ..errors import InvalidSpecError, RunStopped, UnknownTrainerError
from ..execution.leases import Claim, LeaseGuard, Leases
from ..paths import Layout
from . import rkeys
from .evaluation import Scoreboard
from .experience import ExperienceStream
from .files import RolesFiles
from .registry import get_role
from .spec import RoleSpec
from .weights import Fenced, MiB, WeightStore

log = logging.getLogger(__name__)
BEAT_EVERY = 1.0  # seconds between heartbeats of a role (a state change beats at once)
ENDED_POLL = 0.5  # how often `running()` reads the experiment's end mark
NOT_RATES = ("version", "behind")  # heartbeat numbers that are not counts (no rate of them)
UNSCORED_POLL = 0.2  # how often a learner waiting for the evaluators looks again


@dataclass(frozen=True)
class Done:
    """The attempt ended (the experiment ended or was cancelled, or the attempt was
    fenced, or a duplicate delivery found a live holder): acknowledge the message."""

    result: dict[str, Any]


@dataclass(frozen=True)
class HandBack:
    """Requeue the message: the instance was handed back (warm stop, `pause --now`)."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The role function raised: retry the message (Celery caps the retries), or
    (`transient`: Redis unreachable, the instance's own last attempt not yet lapsed)
    retry with backoff, uncapped."""

    error: BaseException
    transient: bool = False


Outcome = Done | HandBack | Failed


def ended(client: redis.Redis, experiment: str) -> str | None:
    raw = cast(bytes | None, client.hget(rkeys.state(experiment), "ended"))
    return raw.decode() if raw else None


@dataclass
class RoleContext:
    spec: RoleSpec
    settings: dict[str, Any]
    device: str
    worker: str
    host: str
    client: redis.Redis
    leases: Leases
    guard: LeaseGuard
    files: RolesFiles
    weights: WeightStore
    experience: ExperienceStream
    _ended_at: float = 0.0
    _ended: str | None = None
    _beat_at: float = 0.0
    _state: str = ""
    _start: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        return self.guard.attempt

    @property
    def instance(self) -> str:
        return rkeys.instance_key(self.spec.experiment, self.spec.role, self.spec.index)

    # -- stopping -----------------------------------------------------------------
    def stop_why(self) -> str | None:
        if (why := self.guard.stop_reason()) is not None:
            return why
        now = time.monotonic()
        if self._ended is None and now - self._ended_at >= ENDED_POLL:
            self._ended_at = now
            self._ended = ended(self.client, self.spec.experiment)
        return None if self._ended is None else f"ended: {self._ended}"

    def running(self) -> bool:
        return self.stop_why() is None

    def paused(self) -> bool:
        return self.leases.paused(self.spec.experiment)

    def wait_unpaused(self, poll: float = 0.2) -> bool:
        """Block while the experiment is paused; False when the role must stop instead."""
        while self.running() and self.paused():
            self.beat("paused")
            time.sleep(poll)
        return self.running()

    # -- heartbeat ------------------------------------------------------------------
    def beat(self, state: str = "running", **stats: Any) -> None:
        """The instance's heartbeat record (throttled to one a second; at once when the
        state changes): host, state, attempt, and `stats` with a rate per second over
        this attempt for each number among them (games, samples, steps)."""
        now = time.time()
        if state == self._state and now - self._beat_at < BEAT_EVERY:
            return
        why = self.guard.stop_reason()
        if why is not None and not why.startswith("cancelled"):
            return  # fenced: the record is the next attempt's now
        self._beat_at, self._state = now, state
        rates = {}
        for key, value in stats.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in NOT_RATES:
                t0, v0 = self._start.setdefault(key, (now, float(value)))
                if now - t0 > 0.5:
                    rates[f"{key}_per_s"] = round((float(value) - v0) / (now - t0), 2)
        record = {"role": self.spec.role, "index": self.spec.index, "kind": self.spec.kind,
                  "function": self.spec.function, "worker": self.worker, "host": self.host,
                  "pid": os.getpid(), "device": self.device, "attempt": self.attempt, "state": state,
                  "at": now, **stats, **rates}
        try:
            self.client.hset(rkeys.beats(self.spec.experiment), self.instance, json.dumps(record))
        except redis.RedisError:
            pass  # a heartbeat is informative: never the reason a role stops

    # -- the learner's ----------------------------------------------------------------
    def publish(self, data: bytes | memoryview, step: int, ack_ids: Sequence[str] = ()) -> int:
        """Publish a version under this attempt's lease (raises Fenced for a zombie),
        acknowledging `ack_ids` of the experience stream with it. Its checkpoint file is
        written before the pointer flips: every version that ever became current has one.
        While `weights.unscored` versions wait for an evaluator it waits (the bound on the
        versions Redis holds); it raises RunStopped if the attempt must stop meanwhile."""
        while not self.weights.room_for_one():
            if (why := self.stop_why()) is not None:
                raise RunStopped(f"version at step {step} not published: {why}", cancelled=why.startswith("cancelled"))
            self.beat("waiting: evaluators", steps=step)
            time.sleep(UNSCORED_POLL)
        self.experience.ensure_group()
        from .experience import GROUP

        version = self.weights.publish(
            data, self.guard.token, keys.lease(self.instance), step=step,
            info={"attempt": self.attempt, "worker": self.worker},
            acks=(self.experience.key, GROUP, list(ack_ids)) if ack_ids else None,
            checkpoint=lambda number, meta: self.files.write_checkpoint(number, data, meta))
        if ack_ids:
            self.experience.trim()
        return version

    def end(self, why: str) -> None:
        """End the experiment (the learner's step budget): every role stops."""
        if self.guard.stop_reason() is not None:
            return  # a fenced attempt ends nothing
        self.client.hsetnx(rkeys.state(self.spec.experiment), "ended", why)
        self.client.hsetnx(rkeys.state(self.spec.experiment), "ended_at", repr(time.time()))
        self.files.write_status({"experiment": self.spec.experiment, "state": "DONE", "why": why,
                                 "ended_at": time.time()})

    # -- evaluators' ---------------------------------------------------------------------
    def eval_slot(self) -> tuple[int, int]:
        """(index, count) of this evaluator: it owes the versions numbered index mod count."""
        return self.spec.index, self.spec.count

    def eval_cursor(self) -> int:
        """The last version this evaluator instance recorded (0: none), durable in Redis."""
        return Scoreboard(self.client, self.spec.experiment).cursor(self.instance)

    def record_eval(self, version: int, scores: dict[str, Any], best_score: float | None = None) -> bool:
        """Record `version`'s scores and move this instance's cursor to it, releasing the
        version's pin, under this attempt's lease (raises Fenced for a zombie); with
        `best_score`, the version becomes the best if it beats the best's. True if it did."""
        became = Scoreboard(self.client, self.spec.experiment).record(
            self.weights, self.instance, keys.lease(self.instance), self.guard.token, version,
            {**scores, "attempt": self.attempt}, best_score)
        self.weights.prune()  # the pin is gone: the version goes unless it is kept
        self.files.write_evaluations(list(evaluations(self.client, self.spec.experiment).values()))
        return became

    def evaluated(self) -> dict[int, dict[str, Any]]:
        return evaluations(self.client, self.spec.experiment)


def evaluations(client: redis.Redis, experiment: str) -> dict[int, dict[str, Any]]:
    raw = cast(dict[bytes, bytes], client.hgetall(rkeys.evals(experiment)))
    out: dict[int, dict[str, Any]] = {}
    for k, v in raw.items():
        try:
            out[int(k)] = {**json.loads(v), "version": int(k)}
        except ValueError:
            continue
    return out


def give_up(client: redis.Redis, layout: Layout, payload: Any, error: BaseException, attempts: int) -> str:
    """A role instance whose function failed `attempts` times in a row ends its experiment
    FAILED, with the reason: every other role stops (a learner waiting on an evaluator
    that will never come back would otherwise wait for ever). Returns the reason."""
    spec = RoleSpec.from_dict(payload)
    why = f"{spec.name} failed {attempts} times, last: {type(error).__name__}: {error}"
    if client.hsetnx(rkeys.state(spec.experiment), "ended", f"failed: {why}"):
        client.hsetnx(rkeys.state(spec.experiment), "ended_at", repr(time.time()))
        RolesFiles(layout, spec.experiment).write_status(
            {"experiment": spec.experiment, "state": "FAILED", "why": why, "ended_at": time.time()})
    log.error("%s: gave up, the experiment ends FAILED", why)
    return why


def run_instance(client: redis.Redis, layout: Layout, payload: Any, worker: str, device: str,
                 task_id: str) -> Outcome:
    """One delivery of a role task: validate, claim, run the role function, release.
    Redis unreachable before the role starts: Failed (the task retries with backoff)."""
    try:
        spec = RoleSpec.from_dict(payload)
        role = get_role(spec.function)
    except (InvalidSpecError, UnknownTrainerError) as exc:
        log.warning("refused a role task: %s", exc)
        return Done({"status": "REFUSED", "why": str(exc)})
    try:
        return _attempt(client, layout, spec, role, worker, device, task_id)
    except redis.RedisError as exc:
        log.warning("%s: Redis unreachable (%s); trying again later", spec.name, exc)
        return Failed(exc, transient=True)


def _attempt(client: redis.Redis, layout: Layout, spec: RoleSpec, role: Any, worker: str, device: str,
             task_id: str) -> Outcome:
    exp = spec.experiment
    if (why := ended(client, exp)) is not None:
        return Done({"status": "ENDED", "why": why})
    leases = Leases(client)
    cancelled = cast(bytes | None, client.get(keys.cancel(exp)))
    if cancelled and (spec.submitted_at is None or float(cancelled) > spec.submitted_at):
        return Done({"status": "CANCELLED"})
    host = socket.gethostname()
    ikey = rkeys.instance_key(exp, spec.role, spec.index)
    info = {"name": spec.name, "experiment": exp, "worker": worker, "host": host, "pid": os.getpid(),
            "task_id": task_id, "role": spec.role, "kind": "role"}
    got = leases.claim(ikey, info)
    if not isinstance(got, Claim):
        if got.get("task_id") == task_id:  # this message's last attempt, whose end Redis missed
            return Failed(RuntimeError(f"{spec.name}: its last attempt's lease has not lapsed yet"), transient=True)
        return Done({"status": "DUPLICATE", "holder": got.get("worker")})
    guard = LeaseGuard(leases, ikey, got, info, exp, spec.submitted_at)
    files = RolesFiles(layout, exp)
    ctx = RoleContext(spec=spec, settings=spec.settings_for(device), device=device, worker=worker, host=host,
                      client=client, leases=leases, guard=guard, files=files,
                      weights=WeightStore(client, exp, keep=spec.keep, chunk_bytes=spec.chunk_mb * MiB,
                                          unscored=spec.unscored if spec.kind == "learner" else 0),
                      experience=ExperienceStream(client, exp, maxlen=spec.maxlen))
    log.info("%s attempt %d started on %s", spec.name, got.attempt, worker)
    outcome: Outcome
    try:
        with guard:
            ctx.beat("starting")
            role.fn(ctx)
        outcome = Done({"status": "STOPPED", "why": ctx.stop_why() or "returned"})
    except (Fenced, RunStopped) as exc:
        outcome = Done({"status": "FENCED", "why": str(exc)})
    except Exception as exc:  # noqa: BLE001 (the role's own failure: retried by the task)
        log.exception("%s attempt %d failed", spec.name, got.attempt)
        outcome = Failed(exc)
    why = guard.stop_reason()
    try:  # Redis may be what failed: the end of the attempt is then the lease's lapse
        if why is not None and not why.startswith("cancelled"):
            entry = leases.active().get(ikey, {})
            if entry.get("handed_back") and entry.get("revoked_token") == guard.token:
                outcome = HandBack(f"{spec.name} handed back")
        if why is not None and why.startswith("cancelled"):
            files.write_status({"experiment": exp, "state": "CANCELLED", "why": why, "ended_at": time.time()})
        ctx.beat({Done: "stopped", HandBack: "handed back", Failed: "failed"}[type(outcome)])
        leases.release(ikey, guard.token)  # (changes nothing once fenced or handed back)
    except redis.RedisError as exc:
        log.warning("%s attempt %d: could not record its end (%s)", spec.name, got.attempt, exc)
    log.info("%s attempt %d: %s", spec.name, got.attempt, outcome)
    return outcome
