"""Roles on real workers (4 CPU workers, a control worker with the watchdog, a private
Redis): the tic-tac-toe example to its target, an actor and the learner SIGKILLed and
started again on another worker within 30 s (the learner from its last version), a
zombie learner (SIGSTOP past its lease, then SIGCONT) that publishes nothing, pause,
resume and cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orchestrator.cluster.local import spawn, start_redis, stop_process, stop_processes
from orchestrator.roles import rkeys
from orchestrator.roles.weights import WeightStore

from .conftest import REPO, cli_env, run_cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]
WORKERS = ("cpu1", "cpu2", "cpu3", "cpu4", "control")
HAND_ON_BOUND = 30.0  # seconds from a role's death to its next attempt running elsewhere


class RolesCluster:
    def __init__(self, base: Path):
        self.base, self.root, self.logs = base, base / "results", base / "logs"
        self.logs.mkdir(parents=True)
        self.redis_proc, self.url = start_redis(base / "redis")
        self.client = redis.Redis.from_url(self.url, socket_timeout=10)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def env(self) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root))

    def start(self, name: str) -> None:
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
        argv = [*base, "--control"] if name == "control" else [*base, "--cpu", "--name", f"{name}@%h"]
        self.workers[name] = spawn(argv, self.env(), self.logs / f"{name}.log")
        self.starts[name] = self.starts.get(name, 0) + 1

    def ensure(self) -> None:
        for name in WORKERS:
            proc = self.workers.get(name)
            if proc is None or proc.poll() is not None:
                self.start(name)
        wait_for(lambda: all(self.log(n).count("ready.") >= self.starts[n] for n in WORKERS),
                 timeout=120, what="workers to be ready")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, node: str, sig: int) -> str:
        name = node.split("@")[0]
        os.killpg(self.workers[name].pid, sig)
        return name

    def beats(self, exp: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(rkeys.beats(exp))
        return {k.decode().rsplit(".", 2)[-2] + "." + k.decode().rsplit(".", 1)[-1]: json.loads(v)
                for k, v in raw.items()}

    def checkpoints(self, exp: str) -> list[dict[str, Any]]:
        folder = self.root / exp / "roles" / "weights"
        return sorted((json.loads(p.read_text()) for p in folder.glob("v*.json")), key=lambda m: m["version"])

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                with_cont(proc)
        stop_processes(self.workers.values(), grace=5)
        stop_process(self.redis_proc)


def with_cont(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolesCluster]:
    c = RolesCluster(tmp_path_factory.mktemp("roles"))
    try:
        c.ensure()
        yield c
    finally:
        c.stop()


def _running(c: RolesCluster, exp: str, instance: str, after_attempt: int = 0, not_on: str | None = None) -> dict[str, Any] | None:
    b = c.beats(exp).get(instance)
    if b and b.get("state") == "running" and int(b.get("attempt") or 0) > after_attempt and b.get("worker") != not_on:
        return b
    return None


def test_the_example_learns_to_its_target(cluster: RolesCluster) -> None:
    """configs/roles/tictactoe.yaml: the evaluator's record of the final version shows
    at least 90% of games won or drawn against a random player."""
    started = time.monotonic()
    proc = run_cli("submit", str(REPO / "configs" / "roles" / "tictactoe.yaml"), env=cluster.env())
    assert proc.returncode == 0, proc.stderr
    exp = "ttt_selfplay"
    status = cluster.root / exp / "roles" / "status.json"
    wait_for(lambda: len(cluster.client.hgetall(rkeys.evals(exp))) >= 8, timeout=120, what="8 scored versions")
    running = run_cli("watch", exp, "--once", env=cluster.env())
    assert "learner.0" in running.stdout and "games_per_s" in running.stdout, running.stdout
    print("\n$ orchestrator watch ttt_selfplay --once\n" + running.stdout)
    wait_for(lambda: status.exists() and json.loads(status.read_text())["state"] == "DONE", timeout=300,
             what="the example to end at its step budget")
    wait_for(lambda: all(b["state"] == "stopped" for b in cluster.beats(exp).values())
             and len(cluster.beats(exp)) == 4, timeout=30, what="every role to stop")
    took = time.monotonic() - started
    shown = run_cli("status", exp, "--json", env=cluster.env())  # the usual commands show roles
    data = json.loads(shown.stdout)
    last = data["evaluations"][-1]
    assert last["step"] == 800, last
    assert last["win_random"] + last["draw_random"] >= 0.9, data["evaluations"]
    store = WeightStore(cluster.client, exp)
    published = int(cluster.client.get(f"{store.prefix}:seq"))
    assert [m["version"] for m in cluster.checkpoints(exp)] == list(range(1, published + 1))
    assert [e["version"] for e in data["evaluations"]] == list(range(1, published + 1))  # each scored
    assert len(store.versions()) <= 4  # keep 3, and the best
    report = run_cli("report", exp, env=cluster.env())
    assert report.returncode == 0 and (cluster.root / exp / "roles" / "winrate.png").stat().st_size > 1000
    print(f"\nexample: {took:.0f} s to the step budget; final version {last['version']}: "
          f"win {last['win_random']:.2f} draw {last['draw_random']:.2f} vs random\n" + report.stdout)


LONG = {
    "experiment": "long_roles",
    "roles": {"learner": {"function": "tictactoe.learner",
                          "settings": {"steps": 1_000_000, "publish_every": 5, "new_per_step": 32}},
              "actor": {"function": "tictactoe.actor", "settings": {"games": 8}},
              "evaluator": {"function": "tictactoe.evaluator", "settings": {"games": 20, "games_best": 10}}},
    "weights": {"keep": 3}, "experience": {"maxlen": 3000},
}


@pytest.fixture(scope="module")
def long_exp(cluster: RolesCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("long") / "long.yaml"
    path.write_text(yaml.safe_dump(LONG))
    proc = run_cli("roles", "submit", str(path), env=cluster.env())
    assert proc.returncode == 0, proc.stderr
    exp = str(LONG["experiment"])
    for instance in ("learner.0", "actor.0", "evaluator.0"):
        wait_for(lambda i=instance: _running(cluster, exp, i), timeout=90, what=f"{instance} to run")
    return exp


def test_an_actor_killed_is_replaced_within_30_s(cluster: RolesCluster, long_exp: str) -> None:
    before = wait_for(lambda: _running(cluster, long_exp, "actor.0"), timeout=30, what="the actor")
    killed = cluster.signal(before["worker"], signal.SIGKILL)
    t0 = time.monotonic()
    after = wait_for(lambda: _running(cluster, long_exp, "actor.0", before["attempt"], before["worker"]),
                     timeout=60, what="the actor's next attempt on another worker")
    took = time.monotonic() - t0
    print(f"\nactor.0 attempt {before['attempt']} on {before['worker']} killed; attempt "
          f"{after['attempt']} running on {after['worker']} after {took:.1f} s")
    assert took <= HAND_ON_BOUND
    games = after.get("games", 0)
    wait_for(lambda: (cluster.beats(long_exp)["actor.0"].get("games") or 0) > games, timeout=30,
             what="the new actor to produce")
    cluster.start(killed)
    cluster.ensure()


def test_the_learner_killed_resumes_from_its_last_version(cluster: RolesCluster, long_exp: str) -> None:
    wait_for(lambda: len(cluster.checkpoints(long_exp)) >= 3, timeout=60, what="three versions")
    before = wait_for(lambda: _running(cluster, long_exp, "learner.0"), timeout=30, what="the learner")
    killed = cluster.signal(before["worker"], signal.SIGKILL)
    t0 = time.monotonic()
    store = WeightStore(cluster.client, long_exp)
    last = store.meta(store.latest() or 0) or {}  # nothing is published after the kill
    assert (cluster.root / long_exp / "roles" / "weights" / f"v{last['version']:08d}.npz").exists()
    after = wait_for(lambda: _running(cluster, long_exp, "learner.0", before["attempt"], before["worker"]),
                     timeout=60, what="the learner's next attempt on another worker")
    took = time.monotonic() - t0
    wait_for(lambda: any(m["attempt"] == after["attempt"] for m in cluster.checkpoints(long_exp)),
             timeout=60, what="a version of the new attempt")
    first_new = next(m for m in cluster.checkpoints(long_exp) if m["attempt"] == after["attempt"])
    print(f"\nlearner attempt {before['attempt']} killed at version {last['version']} (step {last['step']}); "
          f"attempt {after['attempt']} on {after['worker']} after {took:.1f} s; its first version "
          f"{first_new['version']} at step {first_new['step']}")
    assert took <= HAND_ON_BOUND
    assert first_new["step"] == last["step"] + 5  # resumed from the last version, not from 0
    assert first_new["version"] > last["version"]
    cluster.start(killed)
    cluster.ensure()


def test_a_zombie_learner_publishes_nothing(cluster: RolesCluster, long_exp: str) -> None:
    before = wait_for(lambda: _running(cluster, long_exp, "learner.0"), timeout=30, what="the learner")
    name = cluster.signal(before["worker"], signal.SIGSTOP)
    stopped_at = time.time()
    try:
        after = wait_for(lambda: _running(cluster, long_exp, "learner.0", before["attempt"], before["worker"]),
                         timeout=60, what="the learner's next attempt while the old one is stopped")
        wait_for(lambda: any(m["attempt"] == after["attempt"] for m in cluster.checkpoints(long_exp)),
                 timeout=60, what="a version of the new attempt")
    finally:
        cluster.signal(before["worker"], signal.SIGCONT)
    # The zombie wakes, finds its lease gone and stops (its log says so) ...
    wait_for(lambda: f"learner.0 attempt {before['attempt']}: Done" in cluster.log(name), timeout=60,
             what="the zombie learner to stop")
    # ... having published nothing since it was stopped; the new attempt goes on.
    late = [m for m in cluster.checkpoints(long_exp)
            if m["attempt"] == before["attempt"] and m["published_at"] > stopped_at]
    assert late == []
    store = WeightStore(cluster.client, long_exp)
    latest = store.meta(store.latest() or 0) or {}
    assert latest.get("attempt") == after["attempt"]
    print(f"\nzombie learner attempt {before['attempt']}: fenced, nothing published; the log says: "
          + next(line for line in cluster.log(name).splitlines() if f"learner.0 attempt {before['attempt']}: Done" in line))


def test_pause_stops_the_actors_and_resume_lets_them_go(cluster: RolesCluster, long_exp: str) -> None:
    assert run_cli("pause", long_exp, env=cluster.env()).returncode == 0
    wait_for(lambda: cluster.beats(long_exp)["actor.0"]["state"] == "paused", timeout=30, what="the actor to pause")
    length = cluster.client.xlen(rkeys.stream(long_exp))
    games = cluster.beats(long_exp)["actor.0"].get("games")
    time.sleep(3)  # a window in which a producing actor would add several batches
    assert cluster.beats(long_exp)["actor.0"]["state"] == "paused"
    assert cluster.client.xlen(rkeys.stream(long_exp)) <= length  # the learner may still read and trim
    assert run_cli("resume", long_exp, env=cluster.env()).returncode == 0
    wait_for(lambda: (cluster.beats(long_exp)["actor.0"].get("games") or 0) > (games or 0), timeout=30,
             what="the actor to produce again")
    shown = run_cli("watch", long_exp, "--once", env=cluster.env())
    assert "learner.0" in shown.stdout and "games_per_s" in shown.stdout, shown.stdout
    print("\n" + shown.stdout)


def test_cancel_stops_every_role(cluster: RolesCluster, long_exp: str) -> None:
    proc = run_cli("cancel", long_exp, env=cluster.env())
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: all(b["state"] == "stopped" for b in cluster.beats(long_exp).values()), timeout=30,
             what="every role to stop")
    status = json.loads((cluster.root / long_exp / "roles" / "status.json").read_text())
    assert status["state"] == "CANCELLED"
    active = {k.decode(): json.loads(v) for k, v in cluster.client.hgetall("orch:active").items()}
    assert not [k for k, e in active.items() if k.startswith(f"role.{long_exp}.") and e.get("token")]
