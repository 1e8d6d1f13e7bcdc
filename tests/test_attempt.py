"""The attempt's decisions (orchestrator.execution.attempt) against a real redis-server, without any
Celery worker: each delivery is a plain call, its outcome a value."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orchestrator import keys, trainers
from orchestrator.execution import attempt as attempt_mod
from orchestrator.execution.admission import Shares
from orchestrator.execution.attempt import (
    Delivery,
    Finished,
    GiveUp,
    HandBack,
    Park,
    RetryLater,
    RunFailed,
    Services,
    attempt,
)
from orchestrator.execution.leases import Leases
from orchestrator.execution.runner import SharedSink
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand
from orchestrator.experiment.spec import RunSpec
from orchestrator.livestate import LiveState
from orchestrator.paths import Layout

from .conftest import RestartableRedis


@pytest.fixture(autouse=True)
def test_trainers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The trainers of tests/plugins.py registered in this process, as on the workers."""
    monkeypatch.setenv("ORCH_TRAINER_MODULES", "tests.plugins")
    monkeypatch.setenv("ORCH_DEVICE", "cpu")
    monkeypatch.setattr(trainers, "_REGISTRY", None)
    yield
    trainers._REGISTRY = None


@pytest.fixture
def svc(redis_url: str, tmp_path: Path) -> Services:
    client = redis.Redis.from_url(redis_url)
    layout = Layout(tmp_path / "results")
    (tmp_path / "results").mkdir()
    return Services(layout=layout, leases=Leases(client, ttl=5), live=LiveState(client),
                    shares=Shares(client), sink=lambda: SharedSink(layout))


def specs_of(tmp_path: Path, trainer: str = "prior", folds: int = 2, **fields: Any) -> list[dict[str, Any]]:
    name = f"att_{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": name, "trainer": trainer, "datasets": ["iris"],
                                   "folds": folds, "resources": {"gpus": 0}, **fields}))
    return [s.to_dict() for s in expand(load_experiments([str(cfg)])[0])]


def delivery() -> Delivery:
    return Delivery(task_id=uuid.uuid4().hex, hostname="cpu1@test", queue="cpu")


def record(svc: Services, spec: dict[str, Any]) -> dict[str, Any]:
    return json.loads(svc.layout.fold_status(RunSpec.from_dict(spec)).read_text())


def test_a_run_trains_and_a_duplicate_delivery_reports_its_outcome(svc: Services, tmp_path: Path) -> None:
    spec = specs_of(tmp_path)[0]
    first = attempt(svc, spec, time.time(), delivery())
    assert isinstance(first, Finished) and not first.result.get("skipped")
    assert record(svc, spec)["status"] == "DONE"
    again = attempt(svc, spec, time.time(), delivery())
    assert isinstance(again, Finished) and again.result["skipped"]
    rec = record(svc, spec)
    assert [h["attempt"] for h in rec["history"]] == [1]  # the duplicate trained nothing
    assert svc.leases.attempts(RunSpec.from_dict(spec).run_key)["committed"] == 1


def test_a_duplicate_waits_for_the_live_holder_then_reports_its_outcome(
        svc: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempt_mod, "WAIT_POLL_SECONDS", 0.05)
    spec = specs_of(tmp_path, trainer="slow", params={"seconds": 1.0})[0]
    run = RunSpec.from_dict(spec)
    outcomes: list[Any] = []
    holder = threading.Thread(target=lambda: outcomes.append(attempt(svc, spec, None, delivery())))
    holder.start()
    deadline = time.monotonic() + 10
    while not svc.leases.live([run.run_key]) and time.monotonic() < deadline:
        time.sleep(0.01)
    duplicate = attempt(svc, spec, None, delivery())  # waits while the holder trains
    holder.join(timeout=10)
    assert isinstance(outcomes[0], Finished) and not outcomes[0].result.get("skipped")
    assert isinstance(duplicate, Finished) and duplicate.result["skipped"]
    assert [h["attempt"] for h in record(svc, spec)["history"]] == [1]


def test_a_dead_local_pool_process_is_taken_over_at_once_and_counted_lost(svc: Services, tmp_path: Path) -> None:
    spec = specs_of(tmp_path)[0]
    run = RunSpec.from_dict(spec)
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    got = svc.leases.claim(run.run_key, {"host": socket.gethostname(), "pid": dead.pid, "worker": "cpu1@test"})
    assert not isinstance(got, dict)  # a live lease, held by a process that is gone
    started = time.monotonic()
    outcome = attempt(svc, spec, None, delivery())
    assert isinstance(outcome, Finished) and time.monotonic() - started < 4  # not after the lease
    rec = record(svc, spec)
    assert rec["attempt"] == 2 and rec["lost_attempts"] == 1


def test_the_lost_attempt_cap_gives_up_with_the_reason(svc: Services, tmp_path: Path) -> None:
    spec = specs_of(tmp_path, retries=0)[0]
    run = RunSpec.from_dict(spec)
    for _ in range(3):  # three attempts whose processes died (their active entries remain)
        claimed = svc.leases.claim(run.run_key, {"worker": "gone"})
        assert not isinstance(claimed, dict)
        svc.leases.client.delete(f"orch:lease:{run.run_key}")
    outcome = attempt(svc, spec, None, delivery())
    assert isinstance(outcome, GiveUp) and isinstance(outcome.error, RunFailed)
    assert "died 3 times" in str(outcome.error)
    rec = record(svc, spec)
    assert rec["status"] == "FAILED" and rec["attempt"] == 4


def test_cancel_and_pause(svc: Services, tmp_path: Path) -> None:
    specs = specs_of(tmp_path)
    run = RunSpec.from_dict(specs[0])
    sent = time.time()
    svc.leases.client.set(keys.paused(run.experiment), "1")
    parked = attempt(svc, specs[0], sent, delivery())
    assert isinstance(parked, Park) and parked.queue == f"parked.{run.experiment}"
    assert not svc.layout.fold_status(run).exists()  # parking writes nothing
    svc.leases.client.delete(keys.paused(run.experiment))

    svc.leases.client.set(keys.cancel(run.experiment), repr(sent + 1))
    cancelled = attempt(svc, specs[0], sent, delivery())
    assert isinstance(cancelled, GiveUp) and "cancelled" in str(cancelled.error)
    assert record(svc, specs[0])["status"] == "CANCELLED"
    # A message sent after the cancel runs.
    assert isinstance(attempt(svc, specs[1], sent + 2, delivery()), Finished)


def test_a_failure_is_retried_with_backoff_then_failed(svc: Services, tmp_path: Path) -> None:
    spec = specs_of(tmp_path, trainer="flaky", params={"fail_fold": 0}, retries=1)[0]
    first = attempt(svc, spec, None, delivery())
    assert isinstance(first, RetryLater) and first.seconds == 1.0
    assert record(svc, spec)["status"] == "PENDING"
    second = attempt(svc, spec, None, delivery())
    assert isinstance(second, GiveUp) and "deliberate failure" in str(second.error)
    rec = record(svc, spec)
    assert rec["status"] == "FAILED" and [h["outcome"] for h in rec["history"]] == ["RETRY", "FAILED"]


def test_cuda_out_of_memory_is_retried_once_with_the_runs_overrides(
        svc: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_DEVICE", "cuda")
    spec = specs_of(tmp_path, trainer="oom", params={"batch_size": 64, "fits": 32},
                    cuda={"batch_size": 64}, cuda_oom={"batch_size": 16})[0]
    first = attempt(svc, spec, None, delivery())
    assert isinstance(first, RetryLater) and "out of memory" in str(first.error)
    second = attempt(svc, spec, None, delivery())
    assert isinstance(second, Finished), second
    run = RunSpec.from_dict(spec)
    assert svc.leases.attempts(run.run_key).get("oom") == 1
    meta = json.loads(svc.layout.fold_files(run)["metadata.json"].read_text())
    assert meta["params_resolved"]["batch_size"] == 16


def test_a_refused_message_touches_nothing_of_the_run(svc: Services, tmp_path: Path) -> None:
    spec = specs_of(tmp_path)[0]
    assert isinstance(attempt(svc, spec, None, delivery()), Finished)
    run = RunSpec.from_dict(spec)
    status = svc.layout.fold_status(run)
    before = status.read_bytes()
    for hostile in ({**spec, "trainer": "os.system"}, {**spec, "params": {"smoothing": -1}},
                    {**spec, "trainer_version": "999"}):
        outcome = attempt(svc, hostile, None, delivery())
        assert isinstance(outcome, GiveUp) and outcome.refused, outcome
    bad_time = attempt(svc, spec, float("nan"), delivery())
    assert isinstance(bad_time, GiveUp) and bad_time.refused
    assert status.read_bytes() == before
    assert sorted(p.name for p in svc.layout.logs_dir(run).iterdir()) == ["fold_0.attempt_1.log"]


def test_a_zombie_attempt_hands_back_and_writes_nothing(svc: Services, tmp_path: Path) -> None:
    """Its lease taken over while it trains: it writes nothing and hands the delivery back."""
    spec = specs_of(tmp_path, trainer="slow", params={"seconds": 1.5})[0]
    run = RunSpec.from_dict(spec)
    outcomes: list[Any] = []
    zombie = threading.Thread(target=lambda: outcomes.append(attempt(svc, spec, None, delivery())))
    zombie.start()
    deadline = time.monotonic() + 10
    while not (entry := svc.leases.active().get(run.run_key)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert entry is not None
    svc.leases.revoke(run.run_key, entry["token"], why="lease lapsed")  # what the watchdog does
    successor = svc.leases.claim(run.run_key, {"worker": "other"})
    assert not isinstance(successor, dict) and successor.attempt == 2
    zombie.join(timeout=10)
    assert isinstance(outcomes[0], HandBack)
    assert not svc.layout.fold_dir(run).exists()
    assert record(svc, spec)["status"] == "IN_PROGRESS"  # its start mark, nothing after
    assert svc.leases.client.hget(keys.attempts(run.run_key), "committed") is None
    assert not os.listdir(svc.layout.staging_root(run)) if svc.layout.staging_root(run).exists() else True


def test_a_refused_part_counts_in_its_chord_only_if_it_is_one_of_the_chords_runs(tmp_path: Path) -> None:
    from orchestrator.execution.attempt import part_of

    specs = specs_of(tmp_path, folds=3)
    body = {"task": "tasks.finalize", "args": [[specs[0]]], "kwargs": {"folds": [0, 1, 2]}}
    assert part_of(specs[2], body)  # a genuine part (refused for this worker's reasons)
    assert not part_of({**specs[2], "trainer": "os.system"}, body)  # forged: another spec
    assert not part_of({**specs[2], "fold": 5}, body)
    assert not part_of(specs[2], {"task": "tasks.finalize", "kwargs": {"folds": [0, 1]}})
    assert not part_of("junk", body) and not part_of(specs[2], None) and not part_of(specs[2], [1])


# --- Redis restarting is not the run's failure ---------------------------------------------

def _outage_services(server: RestartableRedis, tmp_path: Path) -> Services:
    """Services on `server` through a client that does not retry on its own (as after
    redis-py's own retries ran out): an outage reaches the attempt's code."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    layout = Layout(tmp_path / "results")
    layout.root.mkdir(parents=True, exist_ok=True)
    return Services(layout=layout, leases=Leases(client, ttl=5), live=LiveState(client),
                    shares=Shares(client), sink=lambda: SharedSink(layout))


def _redis_killed_at_renumber(svc: Services, server: RestartableRedis, spec: dict[str, Any],
                              monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The run's status file records an attempt 1 that Redis does not know of (it ran
    before Redis lost its state), so the next attempt's claim (attempt 1 again) is
    renumbered after it (leases.renumber, a round trip): Redis is killed right before
    that round trip, and started again, with its data, a second later."""
    from orchestrator.execution.runner import WorkerInfo, record_failure

    record_failure(RunSpec.from_dict(spec), svc.layout, WorkerInfo.from_env("cpu1@test"), 1,
                   ValueError("an attempt before Redis lost its state"), will_retry=True)
    real = svc.leases.renumber
    restarts: list[threading.Thread] = []

    def renumber(*args: Any, **kwargs: Any) -> Any:
        if not restarts:
            restarts.append(server.restart_soon())
        return real(*args, **kwargs)

    monkeypatch.setattr(svc.leases, "renumber", renumber)
    return restarts


def test_a_redis_restart_mid_attempt_is_retried_not_counted_as_the_runs_failure(
        restartable_redis: RestartableRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """retries: 0, and Redis is killed and restarted during the attempt (what
    test_search's Redis-restart scenario once saw end as a FAILED trial): the attempt is
    retried, the retry claims the run anew (attempt 2, fenced as any) and trains it."""
    svc = _outage_services(restartable_redis, tmp_path)
    spec = specs_of(tmp_path, retries=0)[0]
    run = RunSpec.from_dict(spec)
    restarts = _redis_killed_at_renumber(svc, restartable_redis, spec, monkeypatch)
    first = attempt(svc, spec, None, delivery())
    assert restarts, "the outage was not injected"
    restarts[0].join(timeout=30)
    assert isinstance(first, RetryLater), first
    assert isinstance(first.error, redis.ConnectionError)
    rec = record(svc, spec)
    assert rec["status"] == "PENDING" and "ConnectionError" in rec["error"]
    assert not svc.leases.live([run.run_key])  # the attempt released its lease
    second = attempt(svc, spec, None, delivery())  # the retry: a new delivery
    assert isinstance(second, Finished) and not second.result.get("skipped"), second
    rec = record(svc, spec)
    assert rec["status"] == "DONE" and rec["attempt"] == 2
    assert [(h["attempt"], h["outcome"]) for h in rec["history"]] == [(1, "RETRY"), (2, "DONE")]
    counts = svc.leases.attempts(run.run_key)
    assert counts.get("failed") is None and counts["outages"] == 1 and counts["committed"] == 1


def test_redis_outages_past_the_bound_count_as_the_runs_failure(
        restartable_redis: RestartableRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempt_mod, "OUTAGE_RETRIES", 0)  # this run has had its outages
    svc = _outage_services(restartable_redis, tmp_path)
    spec = specs_of(tmp_path, retries=0)[0]
    restarts = _redis_killed_at_renumber(svc, restartable_redis, spec, monkeypatch)
    outcome = attempt(svc, spec, None, delivery())
    restarts[0].join(timeout=30)
    assert isinstance(outcome, GiveUp) and isinstance(outcome.error, redis.ConnectionError), outcome
    assert record(svc, spec)["status"] == "FAILED"


def test_a_claim_during_a_redis_restart_waits_for_redis(
        restartable_redis: RestartableRedis, tmp_path: Path) -> None:
    """A delivery that arrives while Redis restarts: its claim waits until Redis answers,
    then the run trains (no failure, no retry)."""
    svc = _outage_services(restartable_redis, tmp_path)
    spec = specs_of(tmp_path, retries=0)[0]
    restart = restartable_redis.restart_soon()
    outcome = attempt(svc, spec, None, delivery())
    restart.join(timeout=30)
    assert isinstance(outcome, Finished) and not outcome.result.get("skipped"), outcome
    rec = record(svc, spec)
    assert rec["status"] == "DONE" and [h["outcome"] for h in rec["history"]] == ["DONE"]
