"""Trainer progress reaches Redis at a bounded rate, whatever the training loop does."""

from __future__ import annotations

import time

import redis

from orchestrator.execution.runner import WorkerInfo, _progress_sender
from orchestrator.experiment.spec import DatasetRef, Resources, RunSpec
from orchestrator.livestate import LiveState


def _spec(fold: int) -> RunSpec:
    return RunSpec(experiment="p", trainer="prior", trainer_version="1",
                   dataset=DatasetRef(name="iris", source="sklearn"), params={}, seed=0, fold=fold, k=2,
                   validation=None, holdout=0.2, output="p/iris", point="base",
                   resources=Resources(gpus=0))


def hset_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_hset", {}).get("calls", 0))


def test_a_fast_loop_writes_progress_at_most_once_a_second(private_redis: str) -> None:
    live = LiveState.from_url(private_redis)
    spec = _spec(fold=0)
    send = _progress_sender(live, spec, WorkerInfo(name="cpu1@test", device="cpu", gpu=None))
    before = hset_calls(live.client)
    start = time.monotonic()
    reports = 0
    while time.monotonic() - start < 2.5:  # a loop reporting as fast as it can
        send({"epoch": reports, "loss": 1.0 / (reports + 1)})
        reports += 1
    writes = hset_calls(live.client) - before
    assert reports > 10_000, reports
    assert 2 <= writes <= 3, writes  # at 1 s and 2 s (a slow tick may cost one)
    latest = live.progress()[spec.run_key]
    assert latest["name"] == spec.name and latest["worker"] == "cpu1@test"
    assert 0 < latest["epoch"] < reports and "loss" in latest


def test_a_run_shorter_than_the_interval_sends_no_progress(private_redis: str) -> None:
    live = LiveState.from_url(private_redis)
    spec = _spec(fold=1)
    send = _progress_sender(live, spec, WorkerInfo(name="cpu1@test", device="cpu", gpu=None))
    before = hset_calls(live.client)
    start = time.monotonic()
    while time.monotonic() - start < 0.3:  # a short run: well inside the 1 s interval
        send({"epoch": 1})
    assert hset_calls(live.client) - before == 0
    assert spec.run_key not in live.progress()
