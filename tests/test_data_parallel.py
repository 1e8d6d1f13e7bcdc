"""Data-parallel runs (resources.ranks): validation, the gang's reservation script, and
real gangs of `celery worker` processes meeting through a real redis-server (gloo on CPU).

The cluster: three CPU workers and a control worker, each in its own process group.
"""

from __future__ import annotations

import json
import os
import re
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

from orchestrator import keys
from orchestrator.cluster.local import free_port, spawn, start_redis, stop_process, stop_processes
from orchestrator.execution.gang import Gang, GangNotReady
from orchestrator.execution.runner import WorkerInfo, execute
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand
from orchestrator.paths import Layout

from .conftest import cli_env, run_cli, wait_for

WORKERS = ("cpu1", "cpu2", "cpu3")
# Metrics of a 2-rank run against the same run in one process (same global batches): the
# steps are the same up to float summation order, so the metrics agree to this.
METRIC_TOLERANCE = 1e-3
LOSS_TO_STOP = 15.0  # a rank lost: every rank of its attempt stopped within this (seconds)
RELAUNCH_LIMIT = 30.0  # ... and the run trains again from its checkpoint within this


def write(tmp_path: Path, name: str, **fields: Any) -> Path:
    doc = {"experiment": name, "trainer": "mlp", "datasets": ["iris"], "folds": 2,
           "params": {"epochs": 30, "batch_size": 16, "hidden": [16]},
           "resources": {"gpus": 0, "ranks": 2}, **fields}
    doc = {k: v for k, v in doc.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --- validation ---------------------------------------------------------------------

def test_ranks_of_a_trainer_that_does_not_support_them_exit_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, "bad", trainer="prior", params={},
                resources={"gpus": 0, "ranks": 2, "backend": "nccl", "rank": 1})
    proc = run_cli("validate", str(cfg))
    assert proc.returncode == 2
    assert "resources.ranks: trainer 'prior' does not support ranks" in proc.stderr
    assert "resources.rank: unknown key (did you mean 'ranks'?)" in proc.stderr
    assert "resources.backend: nccl needs GPUs" in proc.stderr
    ok = run_cli("validate", str(write(tmp_path, "good")))
    assert ok.returncode == 0, ok.stderr


def test_a_ranked_spec_round_trips_and_ordinary_messages_are_unchanged(tmp_path: Path) -> None:
    from orchestrator.experiment.spec import RunSpec

    run = expand(load_experiments([str(write(tmp_path, "rt"))])[0])[0]
    data = run.to_dict()
    assert data["resources"] == {"gpus": 0.0, "gpu_memory_gb": None, "ranks": 2, "backend": "auto"}
    assert RunSpec.from_dict(json.loads(json.dumps(data))) == run
    plain = expand(load_experiments([str(write(tmp_path, "plain", resources={"gpus": 0}))])[0])[0]
    assert plain.to_dict()["resources"] == {"gpus": 0.0, "gpu_memory_gb": None}
    assert plain.run_id == run.run_id  # ranks change how a run trains, not what it is


# --- the reservation script, against a real Redis --------------------------------------

@pytest.fixture
def redis_url(module_redis: str) -> str:
    """This module's own Redis (conftest.module_redis): its registry holds only the
    workers these tests register."""
    return module_redis


def _register(client: redis.Redis, names: list[str], device: str = "cpu") -> None:
    from orchestrator.cluster.registry import WorkerRecord, register

    for n in names:
        register(client, WorkerRecord(name=n, host="h", pid=1, gpu=None, device=device,
                                      queues=[keys.rank_queue(n), "cpu"], state="idle", started=0.0,
                                      heartbeat=time.time()), 60)


def test_two_gangs_of_two_on_three_slots_never_hold_each_other(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _register(client, ["w1", "w2", "w3"])
    runs = expand(load_experiments([str(write(tmp_path, "dl"))])[0])  # two folds: two 2-rank runs
    a, b = Gang(client, runs[0], 1), Gang(client, runs[1], 1)
    for run, worker in ((runs[0], "w1"), (runs[1], "w2")):  # each leader holds its run's lease
        client.hset(keys.ACTIVE, run.run_key, json.dumps({"worker": worker}))
    # Both leaders have started (on w1 and w2) and reserve at the same moment: one takes two
    # slots, the other holds none (not one slot waiting for a second), so nothing deadlocks.
    got_a = a.reserve("w1", "cpu")
    with pytest.raises(GangNotReady, match="needs 2 free workers at once, 1 free") as why:
        b.reserve("w2", "cpu")
    assert got_a == ["w1", "w3"]
    held = {k.decode(): client.get(k).decode() for k in client.scan_iter("orch:slot:*")}
    assert sorted(held.values()) == [a.holder, a.holder], held  # b holds nothing
    assert client.hget(keys.gang(runs[1].run_key), "why").decode() == str(why.value)
    a.release(got_a)
    assert list(client.scan_iter("orch:slot:*")) == []
    client.hdel(keys.ACTIVE, runs[0].run_key)
    assert b.reserve("w2", "cpu") == ["w2", "w1"]  # once a's gang ends, b's fills


def test_a_gang_larger_than_the_workers_says_why_and_holds_nothing(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _register(client, ["w1", "w2", "w3"])
    run = expand(load_experiments([str(write(tmp_path, "big", resources={"gpus": 0, "ranks": 5}))])[0])[0]
    with pytest.raises(GangNotReady, match=r"needs 5 workers that take ranks \(cpu\), 3 registered"):
        Gang(client, run, 1).reserve("w1", "cpu")
    assert list(client.scan_iter("orch:slot:*")) == []


def test_nothing_trains_until_all_ranks_joined_and_a_newer_attempt_fences_the_old_one(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.execution.gang import RankWatch

    monkeypatch.setenv("ORCH_GANG_JOIN_SECONDS", "1")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _register(client, ["w1", "w2"])
    run = expand(load_experiments([str(write(tmp_path, "bar", folds=None, split={"validation": 0.3}))])[0])[0]
    old = Gang(client, run, 1)
    assert old.reserve("w1", "cpu") == ["w1", "w2"]
    watch = RankWatch(old, 0, "w1", "h", None).start()
    try:
        started = time.monotonic()
        with pytest.raises(GangNotReady, match="only 1 of 2 ranks joined within 1 s"):
            watch.wait_all()  # rank 1 never came: the bounded barrier gives up
        assert 1.0 <= time.monotonic() - started < 3.0
        old.release(["w1", "w2"])
        Gang(client, run, 2).reserve("w1", "cpu")  # the run's next attempt
        watch.beat()
        assert watch.stop_why == "attempt 2 of the run has replaced attempt 1"
    finally:
        watch.close()


def test_a_lost_ranks_worker_is_passed_over_until_it_beats_again(tmp_path: Path, redis_url: str) -> None:
    """A host cut off stays registered for up to three heartbeats: the relaunch must not
    reserve it (its rank would never come; the gang would wait for the join bound)."""
    from orchestrator.cluster.registry import WorkerRecord, register
    from orchestrator.execution.gang import RankWatch

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _register(client, ["w1", "w2", "w3"])
    run = expand(load_experiments([str(write(tmp_path, "lost", folds=None, split={"validation": 0.3}))])[0])[0]
    old = Gang(client, run, 1)
    assert old.reserve("w1", "cpu") == ["w1", "w2"]
    watch = RankWatch(old, 0, "w1", "h", None)
    watch.all_joined = True  # rank 1 (on w2) joined, then its lease lapsed: no key
    watch.beat()
    assert watch.stop_why == "rank 1 lost its lease (killed, paused or cut off)"
    assert client.hget(keys.gang(run.run_key), "abort").decode() == watch.stop_why
    old.release(["w1", "w2"])
    client.delete(keys.rank(run.run_key, 1, 0))
    assert Gang(client, run, 2).reserve("w1", "cpu") == ["w1", "w3"]  # w2 passed over, though free
    Gang(client, run, 2).release(["w1", "w3"])
    _register(client, ["w3"])
    client.set(keys.slot("w3"), "someone else", px=60_000)  # only w2 is free now
    with pytest.raises(GangNotReady, match="needs 2 free workers at once, 1 free"):
        Gang(client, run, 3).reserve("w1", "cpu")
    register(client, WorkerRecord(name="w2", host="h", pid=1, gpu=None, device="cpu",  # w2 beats again
                                  queues=[keys.rank_queue("w2"), "cpu"], state="idle", started=0.0,
                                  heartbeat=time.time() + 0.01), 60)
    assert Gang(client, run, 4).reserve("w1", "cpu") == ["w1", "w2"]


def test_a_rank_whose_gpu_lacks_the_runs_memory_is_refused_and_the_gang_waits_saying_why(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks 1..N-1 go through rank 0's GPU admission (memory by NVML, the GPU's share):
    a rank refused ends its attempt before anything trains, and its leader waits (tried
    again later, not one of the run's retries), saying why. NVML faked (tests/fake_nvml.py)."""
    from orchestrator.cluster import gpu
    from orchestrator.execution.admission import Shares
    from orchestrator.execution.gang import RankWatch
    from orchestrator.execution.ranks import not_admitted, run_rank

    from .fake_nvml import FakeNVML
    from .test_gpu_admission import machine

    monkeypatch.setenv("ORCH_DEVICE", "cuda")
    monkeypatch.setenv("ORCH_GPU", "0")
    monkeypatch.setenv("ORCH_GANG_JOIN_SECONDS", "10")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    _register(client, ["w1", "w2"], device="cuda")
    run = expand(load_experiments([str(write(tmp_path, "gpuadm", folds=None, split={"validation": 0.3},
                                             resources={"gpus": 1, "gpu_memory_gb": 4, "ranks": 2,
                                                        "backend": "gloo"}))])[0])[0]
    leader = Gang(client, run, 1)
    assert leader.reserve("w1", "cuda") == ["w1", "w2"]
    watch = RankWatch(leader, 0, "w1", "h", "0").start()
    gpu.use_nvml(FakeNVML(machine([1000])))
    try:
        out = run_rank(client, {"spec": run.to_dict(), "rank": 1, "attempt": 1, "backend": "gloo"}, "w2")
        assert out == {"rank": 1, "status": "NOT_ADMITTED",
                       "why": "on w2: GPU 0 has 1000 MiB free, the run needs 4096 MiB"}, out
        started = time.monotonic()
        with pytest.raises(GangNotReady, match="not admitted: rank 1 on w2: GPU 0 has 1000 MiB free"):
            watch.wait_all()  # the leader learns it at its next beat, not at the join bound
        assert time.monotonic() - started < 5
        g = {k.decode(): v.decode() for k, v in client.hgetall(keys.gang(run.run_key)).items()}
        assert g["state"] == "waiting" and g["why"].startswith("not admitted: rank 1 on w2"), g
        leader.release(["w1", "w2"])
        with pytest.raises(GangNotReady, match="needs 2 free workers at once, 1 free"):
            Gang(client, run, 2).reserve("w1", "cuda")  # w2 passed over until it beats again
        # Memory enough: admitted; but a whole GPU each (gpus: 1), and rank 0 holds this one.
        gpu.use_nvml(FakeNVML(machine([8000])))
        here = WorkerInfo("w2", "cuda", "0")
        assert not_admitted(client, run, here) is None
        client.set(keys.lease(run.run_key), "token")  # rank 0's lease: its share counts
        assert Shares(client).acquire(here.host, [0], run.run_key, 1.0)
        assert not_admitted(client, run, here) == "on w2: its GPU share is taken by other runs"
        half = expand(load_experiments([str(write(tmp_path, "gpuhalf", folds=None, split={"validation": 0.3},
                                                  resources={"gpus": 0.5, "ranks": 2, "backend": "gloo"}))])[0])[0]
        client.set(keys.lease(half.run_key), "token")
        client.delete(keys.gpu_share(here.host, 0))
        assert Shares(client).acquire(here.host, [0], half.run_key, 0.5)
        assert not_admitted(client, half, here) is None  # two half shares: rank 0's and this one fit
        monkeypatch.setenv("ORCH_DEVICE", "cpu")
        assert not_admitted(client, run, WorkerInfo("w2", "cpu", None)) is None  # CPU workers: no admission
    finally:
        gpu.use_nvml(None)
        watch.close()


def test_a_rank_that_cannot_renew_its_lease_for_a_whole_lease_stops_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut off from Redis, a rank cannot hear that its peers aborted the attempt; once its
    own lease has lapsed (no renewal for a whole lease) it stops by itself."""
    from orchestrator.execution.gang import RankWatch

    monkeypatch.setenv("ORCH_GANG_LEASE_SECONDS", "1")
    run = expand(load_experiments([str(write(tmp_path, "cut", folds=None, split={"validation": 0.3}))])[0])[0]
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    watch = RankWatch(Gang(nowhere, run, 1), 1, "w2", "h", None)
    started = time.monotonic()
    watch.beat()
    assert watch.stop_why is None  # one failed beat is not a lapsed lease

    def stopped() -> str | None:
        watch.beat()
        return watch.stop_why

    why = wait_for(stopped, timeout=5, what="the rank to stop itself")
    assert why.startswith("cut off from Redis for ") and why.endswith("its rank lease lapsed"), why
    assert 1.0 < time.monotonic() - started < 3.0


def test_ranks_meet_on_the_interface_toward_redis_only_when_redis_is_on_another_host() -> None:
    """Redis on loopback or a unix socket: one host, left to gloo (tests/test_data_parallel_hosts.py
    has the other case for real)."""
    from orchestrator.execution.store import route_interface

    assert route_interface(redis.Redis(host="127.0.0.1", port=free_port())) is None
    assert route_interface(redis.Redis(unix_socket_path="/nonexistent/redis.sock")) is None


# --- real workers -----------------------------------------------------------------------

class GangCluster:
    def __init__(self, base: Path):
        self.base, self.port = base, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.root, self.logs = base / "results", base / "logs"
        self.logs.mkdir(parents=True)
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root), ORCH_CHECKPOINT_EVERY="5",
                       ORCH_PRELOAD_TRAINERS="mlp", **extra)  # ranks start alike: mlp warm in every worker

    def start(self) -> None:
        self.procs["redis"], _ = start_redis(self.base / "redis", self.port)
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
        for n in WORKERS:
            self.procs[n] = spawn([*base, "--cpu", "--name", f"{n}@%h"], self.env(), self.logs / f"{n}.log")
        self.procs["control"] = spawn([*base, "--control"], self.env(), self.logs / "control.log")
        wait_for(lambda: all("ready." in self.log(n) for n in (*WORKERS, "control")), timeout=90,
                 what="workers to be ready")
        wait_for(lambda: len(list(self.client.scan_iter("orch:worker:*"))) == 4, timeout=30,
                 what="workers to register")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        workers = [p for n, p in self.procs.items() if n != "redis" and p.poll() is None]
        for proc in workers:
            with_group_cont(proc)
        stop_processes(workers, grace=15)  # all at once: each hands back what it holds, then exits
        if "redis" in self.procs:
            stop_process(self.procs["redis"])

    def status(self, name: str) -> dict[str, Any]:
        proc = run_cli("status", name, "--json", env=self.env())
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    def finished(self, name: str, timeout: float) -> dict[str, Any]:
        """Polled from the status files in this process (a `status` command per poll costs
        a second of CPU), then as `status --json` says it."""
        from orchestrator.views.overview import experiment_status

        def final() -> bool:
            if not Layout(self.root).manifest(name).exists():
                return False
            st = experiment_status(Layout(self.root), name)
            return all(g["state"] in ("DONE", "FAILED", "CANCELLED") for g in st["group_details"])

        wait_for(final, timeout=timeout, what=f"{name} to finish")
        return self.status(name)

    def ranks(self, run_key: str, attempt: int) -> dict[int, dict[str, Any]]:
        out = {}
        for k in self.client.scan_iter(f"orch:rank:{run_key}:{attempt}:*"):
            raw = self.client.get(k)
            if raw:
                rec = json.loads(raw)
                out[int(rec["rank"])] = rec
        return out

    def gang(self, run_key: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(keys.gang(run_key)).items()}


def with_group_cont(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def gc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GangCluster]:
    c = GangCluster(tmp_path_factory.mktemp("gangs"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def single_process_metrics(cfg: Path, tmp_path: Path) -> list[dict[str, float]]:
    """The same runs trained in this process, one rank, no cluster."""
    runs = expand(load_experiments([str(cfg)])[0])
    layout = Layout(tmp_path / "single")
    return [execute(r, layout, WorkerInfo("here", "cpu", None), 1)["metrics"] for r in runs]


@pytest.mark.integration
def test_two_2_rank_runs_on_three_workers_finish_with_the_single_process_metrics(
        gc: GangCluster, tmp_path: Path) -> None:
    """Two folds, each a 2-rank gang, on three workers: the 3-slot scenario end to end
    (one gang trains while the other waits, holding nothing), then one finalize."""
    cfg = write(tmp_path, "dp2")
    start = time.monotonic()
    assert run_cli("submit", str(cfg), env=gc.env()).returncode == 0
    st = gc.finished("dp2", timeout=120)
    took = time.monotonic() - start
    group = st["group_details"][0]
    assert group["state"] == "DONE" and group["counts"] == {"DONE": 2}, group
    expected = single_process_metrics(cfg, tmp_path)
    for f, want in zip(group["folds"], expected, strict=True):
        meta = json.loads(Path(f["files"]["metadata.json"]).read_text())
        assert meta["trainer_info"]["ranks"] == 2 and meta["trainer_info"]["backend"] == "gloo"
        attempts = {k.decode(): int(v) for k, v in gc.client.hgetall(keys.attempts(f["run_key"])).items()}
        assert attempts.get("committed") == 1
        for metric, value in want.items():
            assert abs(meta["metrics"][metric] - value) <= METRIC_TOLERANCE, (metric, meta["metrics"], want)
        assert not (Path(f["files"]["metadata.json"]).parents[1] / ".checkpoints" / f"fold_{f['fold']}.pt").exists()
    assert list(gc.client.scan_iter("orch:slot:*")) == []  # every reservation released
    print(f"\n2 folds x 2 ranks on 3 workers: DONE in {took:.1f} s")


@pytest.mark.integration
def test_sigkill_of_a_rank_relaunches_the_run_from_its_checkpoint(gc: GangCluster, tmp_path: Path) -> None:
    """A 3-rank run on the three workers; rank 1 SIGKILLed mid-training: the attempt stops,
    the run trains again (all three ranks, a new attempt) from its checkpoint, DONE once."""
    cfg = write(tmp_path, "dpkill", datasets=["digits"], folds=None, split={"validation": 0.3}, retries=2,
                params={"epochs": 24, "batch_size": 32, "hidden": [32]}, resources={"gpus": 0, "ranks": 3})
    assert run_cli("submit", str(cfg), env=gc.env()).returncode == 0
    run = expand(load_experiments([str(cfg)])[0])[0]

    def training_past_checkpoint() -> dict[int, dict[str, Any]] | None:
        attempt = int(gc.gang(run.run_key).get("attempt") or 0)
        ranks = gc.ranks(run.run_key, attempt) if attempt else {}
        return ranks if len(ranks) == 3 and all((r.get("step") or 0) >= 7 for r in ranks.values()) else None

    ranks = wait_for(training_past_checkpoint, timeout=90, what="every rank past epoch 7 (a checkpoint at 5)")
    first = int(gc.gang(run.run_key)["attempt"])
    os.kill(int(ranks[1]["pid"]), signal.SIGKILL)
    killed = time.monotonic()

    def survivors_stopped() -> bool:  # rank 0's lease goes when its attempt ends
        return 0 not in gc.ranks(run.run_key, first)

    wait_for(survivors_stopped, timeout=LOSS_TO_STOP + 5, what="rank 0 of the attempt to stop")
    stopped = time.monotonic() - killed

    def relaunched() -> bool:
        g = gc.gang(run.run_key)
        return int(g.get("attempt") or 0) > first and g.get("state") in ("training", "done")

    wait_for(relaunched, timeout=RELAUNCH_LIMIT + 10, what="the relaunch to train")
    again = time.monotonic() - killed
    st = gc.finished("dpkill", timeout=120)
    group = st["group_details"][0]
    assert group["state"] == "DONE", group
    f = group["folds"][0]
    meta = json.loads(Path(f["files"]["metadata.json"]).read_text())
    assert meta["trainer_info"]["resumed_from_epoch"] and meta["trainer_info"]["resumed_from_epoch"] > 5, meta
    attempts = {k.decode(): int(v) for k, v in gc.client.hgetall(keys.attempts(f["run_key"])).items()}
    assert attempts.get("committed") == 1  # outputs once
    assert meta["trainer_info"]["ranks"] == 3
    # Resumed from its checkpoint (model, optimizer, shuffling and RNG state), the run ends
    # where an uninterrupted one ends: the same run in one process, within the tolerance.
    (want,) = single_process_metrics(cfg, tmp_path)
    for metric, value in want.items():
        assert abs(meta["metrics"][metric] - value) <= METRIC_TOLERANCE, (metric, meta["metrics"], want)
    print(f"\nrank 1 of 3 SIGKILLed: its attempt stopped {stopped:.1f} s later, the run trained again "
          f"{again:.1f} s later, from epoch {meta['trainer_info']['resumed_from_epoch']}")
    assert stopped <= LOSS_TO_STOP and again <= RELAUNCH_LIMIT


@pytest.mark.integration
def test_sigstop_of_a_rank_stops_its_attempt_within_15s(gc: GangCluster, tmp_path: Path) -> None:
    """A paused rank blocks its peers' all-reduce; its lapsed lease (and the short collective
    timeout) stop the attempt within 15 s, not a collective's default 10-30 min. Resumed,
    the paused rank finds itself fenced and writes nothing; the run ends DONE once."""
    # 50 epochs: still training after the `status` and `watch` below on a loaded machine.
    # 200 epochs: the run must still train after `status` and `watch` below (under load,
    # seconds each); with 50 it once ended before the SIGSTOP.
    cfg = write(tmp_path, "dpstop", datasets=["digits"], folds=None, split={"validation": 0.3}, retries=2,
                params={"epochs": 200, "batch_size": 32, "hidden": [32]})
    assert run_cli("submit", str(cfg), env=gc.env()).returncode == 0
    run = expand(load_experiments([str(cfg)])[0])[0]

    def training() -> dict[int, dict[str, Any]] | None:
        attempt = int(gc.gang(run.run_key).get("attempt") or 0)
        ranks = gc.ranks(run.run_key, attempt) if attempt else {}
        return ranks if len(ranks) == 2 and all((r.get("step") or 0) >= 3 for r in ranks.values()) else None

    ranks = wait_for(training, timeout=90, what="both ranks training")
    first = int(gc.gang(run.run_key)["attempt"])
    shown = run_cli("status", "dpstop", env=gc.env()).stdout  # one line per fold, its ranks under it
    assert "gang training" in shown and "  rank 0 " in shown and "  rank 1 " in shown, shown
    frame = run_cli("watch", "dpstop", "--once", env=gc.env(COLUMNS="80")).stdout  # each rank's worker names its run
    assert "[rank 0/2]" in frame and "[rank 1/2]" in frame, frame
    # ... and the run has its ranks under it: worker, host, GPU, step, last beat, attempt.
    assert re.search(rf"· gang training · attempt {first} · 2 ranks", frame), frame
    for r in (0, 1):
        assert re.search(rf"  rank {r}\s+{re.escape(ranks[r]['worker'][:8])}\S*\s+\S+\s+-\s+step \d+\s+\d+\.\ds\s+{first}\b",
                         frame), frame
    print(f"\n`watch dpstop --once` at 80 columns:\n{frame}")
    pid = int(ranks[1]["pid"])
    os.kill(pid, signal.SIGSTOP)
    paused = time.monotonic()
    try:
        wait_for(lambda: 0 not in gc.ranks(run.run_key, first), timeout=LOSS_TO_STOP + 10,
                 what="rank 0 of the paused attempt to stop")
        stopped = time.monotonic() - paused
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "abort" in gc.gang(run.run_key) or int(gc.gang(run.run_key)["attempt"]) > first
    st = gc.finished("dpstop", timeout=120)
    group = st["group_details"][0]
    assert group["state"] == "DONE", group
    f = group["folds"][0]
    attempts = {k.decode(): int(v) for k, v in gc.client.hgetall(keys.attempts(f["run_key"])).items()}
    assert attempts.get("committed") == 1
    print(f"\nrank 1 SIGSTOPped: rank 0 of its attempt stopped {stopped:.1f} s later")
    assert stopped <= LOSS_TO_STOP


@pytest.mark.integration
def test_watch_in_a_real_terminal_shows_each_rank_under_its_run(gc: GangCluster, tmp_path: Path) -> None:
    """`orchestrator watch` in a real pseudo-terminal (tmux, 80x24, as tests/test_watch.py):
    a training 2-rank run with its gang line and one line per rank (worker, host, GPU,
    step, last beat, attempt); q quits with the terminal restored. Then `cancel` ends it."""
    from .test_watch import Tmux, watch_script

    cfg = write(tmp_path, "dpwatch", datasets=["digits"], folds=None, split={"validation": 0.3},
                params={"epochs": 400, "batch_size": 32, "hidden": [32]})
    assert run_cli("submit", str(cfg), env=gc.env()).returncode == 0
    run = expand(load_experiments([str(cfg)])[0])[0]

    def training() -> dict[int, dict[str, Any]] | None:
        attempt = int(gc.gang(run.run_key).get("attempt") or 0)
        ranks = gc.ranks(run.run_key, attempt) if attempt else {}
        return ranks if len(ranks) == 2 and all((r.get("step") or 0) >= 1 for r in ranks.values()) else None

    ranks = wait_for(training, timeout=90, what="both ranks training")
    attempt = int(gc.gang(run.run_key)["attempt"])
    tmux = Tmux(f"orch-dpwatch-{time.monotonic_ns()}")
    try:
        tmux.start(watch_script(tmp_path / "watch.sh", gc.env(), "dpwatch", "--interval", "0.5"))
        rows = [re.compile(rf"  rank {r}\s+{re.escape(ranks[r]['worker'][:8])}\S*\s+\S+\s+-\s+step \d+\s+\d+\.\ds\s+"
                           rf"{attempt}\b") for r in (0, 1)]
        screen = tmux.wait_screen(lambda s: all(row.search(s) for row in rows) and "gang training" in s,
                                  timeout=40, what="the screen to show both ranks under the run")
        lines = screen.rstrip("\n").split("\n")
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, screen
        assert re.search(rf"· gang training · attempt {attempt} · 2 ranks", screen), screen
        tmux("send-keys", "-t", "w", "q")
        after = tmux.wait_screen(lambda s: "watch exited" in s, timeout=15, what="watch to exit on q")
        assert "tty restored" in after and "watch exited 0" in after, after
    finally:
        tmux.kill()
    print(f"\n`watch dpwatch` in tmux (80x24):\n{screen}")
    assert run_cli("cancel", "dpwatch", env=gc.env()).returncode == 0
    st = gc.finished("dpwatch", timeout=60)
    assert st["group_details"][0]["folds"][0]["state"] == "CANCELLED"


@pytest.mark.integration
def test_a_gang_larger_than_the_workers_waits_saying_why_and_holds_no_slot(gc: GangCluster, tmp_path: Path) -> None:
    cfg = write(tmp_path, "dpbig", folds=None, split={"validation": 0.3}, resources={"gpus": 0, "ranks": 4})
    assert run_cli("submit", str(cfg), env=gc.env()).returncode == 0
    run = expand(load_experiments([str(cfg)])[0])[0]
    wait_for(lambda: "needs 4 workers that take ranks (cpu), 3 registered" in (gc.gang(run.run_key).get("why") or ""),
             timeout=30, what="the gang to say why it waits")
    assert "needs 4 workers that take ranks (cpu), 3 registered" in run_cli("status", "dpbig", env=gc.env()).stdout
    for _ in range(10):  # while it waits (tried again every few seconds), it holds nothing
        assert list(gc.client.scan_iter("orch:slot:*")) == []
        time.sleep(0.2)
    assert run_cli("cancel", "dpbig", env=gc.env()).returncode == 0
    st = gc.finished("dpbig", timeout=30)
    assert st["group_details"][0]["folds"][0]["state"] == "CANCELLED"
