"""tasks/overhead.py: a worker shares one Redis client per kombu channel, and publishes
its task events in timed batches, none lost at shutdown."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from orchestrator.cluster.local import spawn, stop_process
from tasks.overhead import _conn_or_acquire, share_channel_clients

from .conftest import cli_env, run_cli, wait_for

pytestmark = pytest.mark.integration


def test_a_channel_sends_every_command_through_one_client_per_pool(
        private_redis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kombu_redis.Channel, "conn_or_acquire", kombu_redis.Channel.conn_or_acquire)
    built: list[Any] = []
    create = kombu_redis.Channel._create_client

    def counting(self: Any, asynchronous: bool = False) -> Any:
        built.append(client := create(self, asynchronous))
        return client

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", counting)
    assert share_channel_clients() and share_channel_clients()  # idempotent
    assert kombu_redis.Channel.conn_or_acquire is _conn_or_acquire

    with Connection(private_redis) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            first.set("k", "v")
            assert second.get("k") == b"v"
        given = redis.Redis.from_url(private_redis)
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        before = len(built)
        with conn.Producer() as producer:  # five messages: no client built for any of them
            for i in range(5):
                producer.publish({"i": i}, routing_key="q", declare=[])
        assert len(built) == before
        with channel.conn_or_acquire() as again:
            assert again is first and again.llen("q") == 5
        channel._pool = None  # as after a reconnection: a new pool, so a new client
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
            assert third.get("k") == b"v"
        assert len(built) == before + 1
        given.close()


class EventTap:
    """Every Celery event message published on the broker, as Redis carries it: which
    events came in which message, and when."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("*celeryev*")
        self.messages: list[list[dict[str, Any]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is None or message["type"] != "pmessage":
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            events = json.loads(body)
            self.messages.append(events if isinstance(events, list) else [events])

    def task_events(self, hostname: str) -> list[dict[str, Any]]:
        return [e for m in list(self.messages) for e in m
                if e.get("hostname") == hostname and e["type"].startswith("task-")]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()


@contextlib.contextmanager
def tapped_worker(url: str, tmp_path: Path, name: str, interval: str) -> Iterator[tuple[dict[str, str], EventTap, Any]]:
    """A training+control worker with ORCH_EVENT_FLUSH_INTERVAL=`interval`, and a tap
    that is listening before the first run is submitted: (environment, tap, process)."""
    env = cli_env(ORCH_BROKER_URL=url, ORCH_RESULTS_ROOT=str(tmp_path / "results"),
                  ORCH_EVENT_FLUSH_INTERVAL=interval)
    tap = EventTap(url)
    worker = spawn([sys.executable, "-m", "orchestrator", "worker", "--cpu", "--accept-gpu-runs",
                    "--control", "--name", name, "--loglevel", "INFO"], env, tmp_path / "worker.log")
    try:
        # The worker's own events (worker-online, heartbeats) are not batched: once one
        # arrived, the tap is listening.
        wait_for(lambda: any(e.get("hostname") == name for m in tap.messages for e in m),
                 timeout=60, what="the worker's first event")
        yield env, tap, worker
    finally:
        stop_process(worker)
        tap.close()


def carrying(tap: EventTap, hostname: str) -> list[list[dict[str, Any]]]:
    """The messages that carried task events of `hostname`."""
    return [m for m in tap.messages
            if any(e.get("hostname") == hostname and e["type"].startswith("task-") for e in m)]


def test_task_events_wait_for_their_batch_and_a_stopping_worker_sends_them(
        private_redis: str, tmp_path: Path, write_experiment: Any) -> None:
    # An interval far longer than the test: every task event is still waiting when the
    # runs are DONE, and the warm shutdown must publish them (18 < Celery's buffer limit 24).
    with tapped_worker(private_redis, tmp_path, "batch@test", "600") as (env, tap, worker):
        exp = write_experiment("batched", trainer="prior", datasets=["iris"], folds=2, seeds=[0],
                               sweep={"grid": {"smoothing": [0.1, 0.2]}})
        proc = run_cli("submit", str(exp), "--wait", env=env)
        assert proc.returncode == 0, proc.stderr
        assert tap.task_events("batch@test") == []  # 4 runs and 2 finalizes done, nothing sent yet
        stop_process(worker)
        assert worker.returncode == 0
        events = wait_for(lambda: (ev := tap.task_events("batch@test")) and len(ev) >= 18 and ev,
                          timeout=30, what="the worker's task events after its shutdown")
    by_task: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    for e in events:
        by_task.setdefault(e["uuid"], set()).add(e["type"])
        if e["type"] == "task-received":
            names[e["uuid"]] = e["name"]
    assert sorted(names.values()) == ["tasks.finalize"] * 2 + ["tasks.train_run"] * 4
    assert all(types == {"task-received", "task-started", "task-succeeded"} for types in by_task.values())
    assert len(carrying(tap, "batch@test")) == 1  # one batch: all 18


def test_a_short_interval_sends_several_runs_events_in_one_message(
        private_redis: str, tmp_path: Path, write_experiment: Any) -> None:
    with tapped_worker(private_redis, tmp_path, "often@test", "0.5") as (env, tap, _):
        exp = write_experiment("often", trainer="prior", datasets=["iris"], folds=5, seeds=[0],
                               sweep={"grid": {"smoothing": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}})
        proc = run_cli("submit", str(exp), "--wait", env=env)
        assert proc.returncode == 0, proc.stderr
        # Sent within the interval after the last one: no shutdown needed.
        wait_for(lambda: sum(e["type"] == "task-succeeded" for e in tap.task_events("often@test")) == 36,
                 timeout=30, what="task-succeeded of 30 runs and 6 finalizes")
    # Celery's own cadence (ORCH_EVENT_FLUSH_INTERVAL=0) sends about one message per event,
    # 108 here; every 0.5 s, a few.
    sent = len(carrying(tap, "often@test"))
    assert sent < 36, f"{sent} messages for 108 task events"
