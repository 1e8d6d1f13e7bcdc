"""Fault injection against a real redis-server and real `celery worker` processes, each
in its own process group: kills, pauses, restarts and cuts while runs train.

Every scenario ends with the same audit: final states, each fold's outputs committed
exactly once, the group's chord callback run once, no partial file anywhere under the
results root, and (where a worker was lost) how long the run took to be handed on.
Leases use the defaults (10 s, watchdog every 2 s): the promise is "within 30 s".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import keys
from orchestrator.cluster.local import free_port, spawn, stop_process, stop_processes

from .conftest import cli_env, run_cli, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]

REASSIGN_LIMIT = 30.0
# With a free worker, a dead worker's run starts again within this (lease 10 s, watchdog
# every 2 s, its message back at the head of its queue).
FREE_SLOT_LIMIT = 15.0
WORKERS = ("cpu1", "cpu2", "control")


class FaultCluster:
    """A private Redis (restartable, on a fixed port and folder) and three workers."""

    def __init__(self, base: Path):
        self.base = base
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.root = base / "results"
        self.logs = base / "logs"
        self.logs.mkdir(parents=True)
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root), **extra)

    # --- redis -------------------------------------------------------------------
    def start_redis(self, persist: bool = True) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is needed (scripts/install.sh installs it)"
        data = self.base / "redis"
        data.mkdir(exist_ok=True)
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--appendonly", "yes" if persist else "no",
                "--appendfsync", "always", "--maxmemory-policy", "noeviction",
                "--logfile", str(data / "redis.log")]
        self.redis_proc = spawn(argv, dict(os.environ), data / "redis.out")
        wait_for(self._redis_up, timeout=20, what="redis-server to answer")

    def _redis_up(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def stop_redis(self, sig: int = signal.SIGKILL) -> None:
        assert self.redis_proc is not None
        stop_process(self.redis_proc, sig=sig, grace=10)
        self.redis_proc = None

    # --- workers -----------------------------------------------------------------
    def start_worker(self, name: str) -> None:
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
        argv = {"cpu1": [*base, "--cpu", "--accept-gpu-runs", "--name", "cpu1@%h"],
                "cpu2": [*base, "--cpu", "--accept-gpu-runs", "--name", "cpu2@%h"],
                "control": [*base, "--control"]}[name]
        self.workers[name] = spawn(argv, self.env(), self.logs / f"{name}.log")
        self.starts[name] = self.starts.get(name, 0) + 1

    def ensure_workers(self) -> None:
        """Every worker up (restarting any a previous scenario killed) and consuming."""
        for name in WORKERS:
            proc = self.workers.get(name)
            if proc is None or proc.poll() is not None:
                self.start_worker(name)
        wait_for(lambda: all(self.log(n).count("ready.") >= self.starts[n] for n in WORKERS),
                 timeout=90, what="workers to be ready")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.workers[name].pid, sig)

    def worker_named(self, node: str) -> str:
        return node.split("@")[0]

    # --- runs ----------------------------------------------------------------------
    def active(self, experiment: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall("orch:active")
        entries = {k.decode(): json.loads(v) for k, v in raw.items()}
        return {k: e for k, e in entries.items() if e.get("experiment") == experiment and e.get("token")}

    def wait_running(self, experiment: str, n: int = 1, timeout: float = 60) -> dict[str, dict[str, Any]]:
        return wait_for(lambda: (a := self.active(experiment)) and len(a) >= n and a,
                        timeout=timeout, what=f"{n} runs of {experiment} to be training")

    def stop(self) -> None:
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)  # a paused group cannot act on SIGTERM
        stop_processes(self.workers.values(), grace=15)
        if self.redis_proc is not None:
            stop_process(self.redis_proc)


def with_group_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGCONT)  # a paused group cannot act on SIGTERM
    except ProcessLookupError:
        return
    stop_process(proc, grace=15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    c = FaultCluster(tmp_path_factory.mktemp("faults"))
    c.start_redis()
    try:
        c.ensure_workers()
        yield c
    finally:
        c.stop()


@pytest.fixture
def fc(cluster: FaultCluster) -> FaultCluster:
    if cluster.redis_proc is None:
        cluster.start_redis()
    cluster.ensure_workers()
    return cluster


def experiment(tmp_path: Path, name: str, seconds: float, folds: int = 2, short_fold: int = -1,
               **extra: Any) -> Path:
    import yaml

    doc = {"experiment": name, "trainer": "slow", "datasets": ["iris"], "folds": folds,
           "params": {"seconds": seconds, "short_fold": short_fold}, "resources": {"gpus": 0},
           **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def submit(fc: FaultCluster, cfg: Path, wait: bool = False, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    args = ["submit", str(cfg)] + (["--wait"] if wait else [])
    return run_cli(*args, env=fc.env(), timeout=timeout)


def status(fc: FaultCluster, name: str) -> dict[str, Any]:
    proc = run_cli("status", name, "--json", env=fc.env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_group_final(fc: FaultCluster, name: str, timeout: float = 120) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        st = status(fc, name)
        return st if all(g["state"] in ("DONE", "FAILED", "CANCELLED") for g in st["group_details"]) else None

    return wait_for(final, timeout=timeout, what=f"{name} to finish")


def _fold_record(fc: FaultCluster, name: str, fold: int) -> dict[str, Any]:
    found = list((fc.root / name).glob(f"**/status/fold_{fold}.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def audit(fc: FaultCluster, name: str, folds: int = 2, state: str = "DONE", timeout: float = 120) -> dict[str, Any]:
    """The invariants every scenario must end with."""
    st = wait_group_final(fc, name, timeout)
    assert [g["state"] for g in st["group_details"]] == [state], st["group_details"]
    group = st["group_details"][0]
    if state == "DONE":
        assert group["counts"] == {"DONE": folds}
        for f in group["folds"]:
            attempts = {k.decode(): int(v) for k, v in fc.client.hgetall(f"orch:attempts:{f['run_key']}").items()}
            assert attempts.get("committed") == 1, (f["name"], attempts)  # outputs written once
            meta = json.loads(Path(f["files"]["metadata.json"]).read_text())
            assert meta["attempt"] == f["attempt"], (meta["attempt"], f)  # by the attempt recorded
            for path in f["files"].values():
                assert Path(path).stat().st_size > 0
        rows = (fc.root / name / "final_results.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + folds, rows  # one row per run, header included
        assert fc.client.get(keys.group_finalized(name, group["group_id"])) == b"1"  # chord body once
    partial = [p for p in fc.root.rglob("*") if p.name.endswith(".tmp") or p.name == ".staging"
               or p.parent.name == ".staging"]
    assert partial == [], partial  # nothing half-written left anywhere, no staging folder
    return st


def reassigned_after(fc: FaultCluster, name: str, fold: int, since: float) -> float:
    """Seconds from `since` (the fault) to the start of the fold's next attempt."""
    history = _fold_record(fc, name, fold)["history"]
    later = [h["started_at"] for h in history if h["started_at"] > since]
    assert later, history
    return min(later) - since


def pop_queued(fc: FaultCluster, queue: str) -> bytes | None:
    """Take the oldest message off `queue` as a worker's BRPOP would (kombu's priority
    lists: `queue`, `queue:N`); None if it holds none."""
    keys = [k for k in fc.client.scan_iter(match=f"{queue}*")
            if k == queue.encode() or k.startswith(f"{queue}:".encode())]
    return next((raw for k in keys if (raw := fc.client.rpop(k))), None)


def the_run(fc: FaultCluster, name: str) -> tuple[str, dict[str, Any]]:
    """The run of fold 0 once it is training (in experiments made with short_fold=1,
    the other fold ends at once, so another worker is free to take fold 0 over)."""
    def found() -> tuple[str, dict[str, Any]] | None:
        for run_id, entry in fc.active(name).items():
            if entry["name"].endswith("/fold=0"):
                return run_id, entry
        return None

    return wait_for(found, timeout=60, what=f"fold 0 of {name} to be training")


def fold_of(fc: FaultCluster, name: str, run_id: str) -> int:
    for g in status(fc, name)["group_details"]:
        for f in g["folds"]:
            if f["run_key"] == run_id:
                return int(f["fold"])
    raise AssertionError(run_id)


# --- scenarios -------------------------------------------------------------------------

def test_sigkill_of_the_pool_process_retries_the_run(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_child", seconds=4, short_fold=1)
    submit(fc, cfg)
    run_id, entry = the_run(fc, "f_child")
    fold = fold_of(fc, "f_child", run_id)
    killed_at = time.time()
    os.kill(int(entry["pid"]), signal.SIGKILL)  # the pool child, not the worker
    audit(fc, "f_child")
    record = _fold_record(fc, "f_child", fold)
    assert [h["outcome"] for h in record["history"]] == ["LOST", "DONE"], record["history"]
    assert record["lost_attempts"] == 1
    assert reassigned_after(fc, "f_child", fold, killed_at) < REASSIGN_LIMIT
    assert all(p.poll() is None for p in fc.workers.values())  # the worker survived


def test_sigkill_of_a_whole_worker_hands_its_run_to_another_within_30s(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_group", seconds=6, short_fold=1)
    submit(fc, cfg)
    run_id, entry = the_run(fc, "f_group")
    fold = fold_of(fc, "f_group", run_id)
    victim = fc.worker_named(entry["worker"])
    killed_at = time.time()
    fc.kill_worker(victim)  # host death: the main process and its pool, no goodbye
    st = audit(fc, "f_group")
    took = reassigned_after(fc, "f_group", fold, killed_at)
    print(f"reassigned {took:.1f} s after SIGKILL of {victim}")
    assert took < FREE_SLOT_LIMIT
    done_by = [f["worker"] for f in st["group_details"][0]["folds"] if f["fold"] == fold]
    assert done_by and not done_by[0].startswith(victim + "@")
    assert "lease" in fc.log("control") and "lapsed" in fc.log("control")


def test_a_paused_worker_comes_back_as_a_zombie_and_writes_nothing(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_zombie", seconds=8, short_fold=1)
    submit(fc, cfg)
    run_id, entry = the_run(fc, "f_zombie")
    fold = fold_of(fc, "f_zombie", run_id)
    victim = fc.worker_named(entry["worker"])
    paused_at = time.time()
    fc.kill_worker(victim, signal.SIGSTOP)
    try:
        # Another worker takes the run over while the paused one still "trains" it.
        wait_for(lambda: (e := fc.active("f_zombie").get(run_id)) and e["token"] != entry["token"],
                 timeout=REASSIGN_LIMIT + 15, what="the paused worker's run to be taken over")
        took = time.time() - paused_at
    finally:
        fc.kill_worker(victim, signal.SIGCONT)
    assert took < REASSIGN_LIMIT
    audit(fc, "f_zombie")
    wait_for(lambda: "stops without writing" in fc.log(victim), timeout=30,
             what="the zombie to notice its lease is gone")
    record = _fold_record(fc, "f_zombie", fold)
    assert record["attempt"] >= 2 and record["history"][-1]["outcome"] == "DONE"
    assert record["history"][-1]["worker"] != entry["worker"]


def test_redis_restart_with_persistence_mid_run(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_restart", seconds=5, folds=3)
    waiter = subprocess.Popen([sys.executable, "-m", "orchestrator", "submit", str(cfg), "--wait"],
                              env=fc.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fc.wait_running("f_restart")
    fc.stop_redis(signal.SIGKILL)
    time.sleep(2)  # the outage itself (what is under test is surviving it)
    fc.start_redis(persist=True)
    out, err = waiter.communicate(timeout=180)
    assert waiter.returncode == 0, err
    assert "Traceback" not in err
    audit(fc, "f_restart", folds=3)


def test_redis_restart_without_persistence_is_redispatched_from_the_status_files(
        fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_amnesia", seconds=4, folds=3)
    submit(fc, cfg)
    fc.wait_running("f_amnesia")
    fc.stop_redis(signal.SIGKILL)
    shutil.rmtree(fc.base / "redis")  # nothing survives: queues, chord counters, leases
    fc.start_redis(persist=True)
    st = wait_group_final(fc, "f_amnesia", timeout=180)
    assert st["group_details"][0]["state"] == "DONE", st
    assert "Redis lost its data" in fc.log("control")
    partial = [p for p in fc.root.rglob("*") if p.name.endswith(".tmp") or p.parent.name == ".staging"]
    assert partial == []
    rows = (fc.root / "f_amnesia" / "final_results.csv").read_text().strip().splitlines()
    assert len(rows) == 4


def test_killed_client_connections_do_not_duplicate_runs(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_clientkill", seconds=5, folds=2)
    submit(fc, cfg)
    fc.wait_running("f_clientkill")
    killed = fc.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert int(killed) > 0
    audit(fc, "f_clientkill")


def test_orchestrator_killed_mid_run_and_run_again(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_orch", seconds=3, folds=3)
    waiter = subprocess.Popen([sys.executable, "-m", "orchestrator", "submit", str(cfg), "--wait"],
                              env=fc.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fc.wait_running("f_orch")
    waiter.kill()
    waiter.wait()
    proc = submit(fc, cfg, wait=True)
    assert proc.returncode == 0, proc.stderr
    st = wait_group_final(fc, "f_orch")
    group = st["group_details"][0]
    assert group["state"] == "DONE"
    for f in group["folds"]:  # every run trained and committed once, resubmission or not
        committed = fc.client.hget(f"orch:attempts:{f['run_key']}", "committed")
        assert committed == b"1", f
    rows = (fc.root / "f_orch" / "final_results.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # finalize is idempotent even if both submissions' chords ran it


def test_warm_stop_hands_the_run_back_at_once(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_warm", seconds=6.25, short_fold=1)  # own group_id (f_group: 6)
    submit(fc, cfg)
    run_id, entry = the_run(fc, "f_warm")
    fold = fold_of(fc, "f_warm", run_id)
    victim = fc.worker_named(entry["worker"])
    stopped_at = time.time()
    os.kill(fc.workers[victim].pid, signal.SIGTERM)  # what systemd or `workers down` sends
    fc.workers[victim].wait(timeout=30)
    audit(fc, "f_warm")
    took = reassigned_after(fc, "f_warm", fold, stopped_at)
    print(f"handed back and restarted {took:.1f} s after SIGTERM")
    assert took < 5.0  # at once: not after the 10 s lease
    record = _fold_record(fc, "f_warm", fold)
    assert record["lost_attempts"] == 0  # handed back is not a crash


def test_cancel_then_resume(fc: FaultCluster, tmp_path: Path) -> None:
    cfg = experiment(tmp_path, "f_cancel", seconds=8, folds=4)
    submit(fc, cfg)
    fc.wait_running("f_cancel", n=2)
    proc = run_cli("cancel", "f_cancel", env=fc.env())
    assert proc.returncode == 0, proc.stderr
    assert "2 queued runs CANCELLED, 2 running runs stopping" in proc.stdout
    st = audit(fc, "f_cancel", folds=4, state="CANCELLED")
    folds = st["group_details"][0]["folds"]
    assert [f["state"] for f in folds] == ["CANCELLED"] * 4
    for f in folds:  # nothing was committed for a cancelled run
        assert not Path(f["files"]["metadata.json"]).exists()
    proc = submit(fc, cfg, wait=True)
    assert proc.returncode == 0, proc.stderr
    audit(fc, "f_cancel", folds=4)


def test_a_poison_run_is_given_up_after_capped_attempts(fc: FaultCluster, tmp_path: Path) -> None:
    """A run that SIGKILLs its process every time: retried, never forever, then FAILED;
    the other folds finish and the group is recorded FAILED once."""
    import yaml

    cfg = tmp_path / "f_poison.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": "f_poison", "trainer": "killed", "datasets": ["iris"],
                                   "folds": 2, "params": {"kill_fold": 1}, "resources": {"gpus": 0}}))
    proc = submit(fc, cfg, wait=True)
    assert proc.returncode == 1, proc.stderr
    st = audit(fc, "f_poison", state="FAILED")
    folds = {f["fold"]: f for f in st["group_details"][0]["folds"]}
    assert folds[0]["state"] == "DONE" and folds[1]["state"] == "FAILED"
    assert "died 3 times" in folds[1]["error"] and folds[1]["attempt"] == 4
    history = _fold_record(fc, "f_poison", 1)["history"]
    assert [h["outcome"] for h in history] == ["LOST", "LOST", "LOST", "FAILED"]
    assert fc.client.hget(f"orch:attempts:{folds[1]['run_key']}", "committed") is None


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder`: (inode, mtime_ns, bytes). Any rewrite, rename or
    replacement of a file changes it."""
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            found[str(p.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return found


def test_a_zombie_that_wakes_after_its_successor_committed_changes_nothing(
        fc: FaultCluster, tmp_path: Path) -> None:
    """Issue 6's first finding: the zombie used to take its released lease back, move the
    successor's fold aside and rewrite its status as attempt 1. Now it is fenced for good."""
    cfg = experiment(tmp_path, "f_late_zombie", seconds=6.5, short_fold=1)  # own group_id
    submit(fc, cfg)
    run_id, entry = the_run(fc, "f_late_zombie")
    fold = fold_of(fc, "f_late_zombie", run_id)
    victim = fc.worker_named(entry["worker"])
    paused_at = time.time()
    fc.kill_worker(victim, signal.SIGSTOP)
    try:
        st = audit(fc, "f_late_zombie")  # the successor finished it: committed, finalized
        took = reassigned_after(fc, "f_late_zombie", fold, paused_at)
        assert took < FREE_SLOT_LIMIT, took
        assert fc.client.hget(f"orch:lease:{run_id}", "x") is None  # released by the successor
        before = snapshot(fc.root / "f_late_zombie")
        record = _fold_record(fc, "f_late_zombie", fold)
        assert record["attempt"] == 2 and [h["outcome"] for h in record["history"]] == ["LOST", "DONE"]
    finally:
        fc.kill_worker(victim, signal.SIGCONT)
    wait_for(lambda: "stops without writing" in fc.log(victim), timeout=30,
             what="the zombie to notice it was superseded")
    # The zombie has finished its attempt (its log line comes after its last action); the
    # disk is exactly as the successor left it: no file renamed, rewritten or removed.
    # Only the zombie's own attempt log may grow (it says there why it stopped), and only
    # by appending.
    after = snapshot(fc.root / "f_late_zombie")
    assert after.keys() == before.keys()
    own_log = f"iris/base/seed=0/logs/fold_{fold}.attempt_1.log"
    assert after[own_log][2].startswith(before[own_log][2])
    changed = [name for name in before if before[name] != after[name] and name != own_log]
    assert changed == [], changed
    meta = json.loads(Path(st["group_details"][0]["folds"][fold]["files"]["metadata.json"]).read_text())
    assert meta["attempt"] == 2 and not meta["worker"].startswith(victim + "@")
    rows = (fc.root / "f_late_zombie" / "final_results.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    assert fc.client.hget(f"orch:attempts:{run_id}", "committed") == b"1"
    assert fc.workers[victim].poll() is None  # the zombie's worker lives on and serves
    audit(fc, "f_late_zombie")


def test_a_dead_workers_run_goes_back_to_the_head_of_its_queue(fc: FaultCluster, tmp_path: Path) -> None:
    """10 runs queued behind the killed one: it starts again on the next free slot,
    before every run that was still queued when it was handed back."""
    cfg = experiment(tmp_path, "f_head", seconds=4, folds=14)
    submit(fc, cfg)
    running = fc.wait_running("f_head", n=2)
    run_id, entry = next(iter(running.items()))
    victim = fc.worker_named(entry["worker"])
    killed_at = time.time()
    fc.kill_worker(victim)
    # The moment the watchdog hands it back (revokes the dead attempt's token).
    wait_for(lambda: (e := json.loads(fc.client.hget("orch:active", run_id) or b"{}")) and e.get("token") != entry["token"],
             timeout=REASSIGN_LIMIT, what="the dead worker's run to be handed back")
    handed_at = time.time()
    fc.start_worker(victim)
    st = audit(fc, "f_head", folds=14)
    fold = fold_of(fc, "f_head", run_id)
    restarted = killed_at + reassigned_after(fc, "f_head", fold, killed_at)
    print(f"restarted {restarted - killed_at:.1f} s after the kill, handed back after {handed_at - killed_at:.1f} s")
    firsts = {f["fold"]: min(h["started_at"] for h in _fold_record(fc, "f_head", f["fold"])["history"])
              for f in st["group_details"][0]["folds"]}
    # Runs that first started after the hand-back (+0.5 s for the poll above) were queued
    # behind it: none may start before its restart.
    jumped = [f for f, t in firsts.items() if f != fold and t > handed_at + 0.5 and t < restarted]
    assert jumped == [], (jumped, restarted, handed_at)
    later = [f for f, t in firsts.items() if t > handed_at + 0.5]
    assert later, "the test needs runs still queued at the hand-back"


def test_an_attempt_killed_while_writing_leaves_nothing_behind(fc: FaultCluster, tmp_path: Path) -> None:
    import yaml

    marker = tmp_path / "killed-once"
    cfg = tmp_path / "f_midwrite.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": "f_midwrite", "trainer": "midwrite", "datasets": ["iris"],
                                   "folds": 2, "params": {"kill_fold": 0, "unless": str(marker)},
                                   "resources": {"gpus": 0}}))
    proc = submit(fc, cfg, wait=True)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()  # the first attempt of fold 0 did die while writing
    audit(fc, "f_midwrite")  # no staging folder, no partial file left
    history = _fold_record(fc, "f_midwrite", 0)["history"]
    assert [h["outcome"] for h in history] == ["LOST", "DONE"], history


def test_a_run_redone_by_a_second_run_keeps_its_history_and_logs(tmp_path: Path) -> None:
    """Local mode starts a fresh Redis each time: attempt numbers still keep counting."""
    import yaml

    root = tmp_path / "results"
    cfg = tmp_path / "redo.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": "redo", "trainer": "chatty", "datasets": ["iris"],
                                   "folds": 2, "params": {"fail_fold": -1}, "resources": {"gpus": 0}}))
    env = cli_env()
    first = run_cli("run", str(cfg), "--workers", "1", "--results-root", str(root), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    fold0 = root / "redo" / "iris" / "base" / "seed=0"
    (fold0 / "fold_0" / "predictions.csv").write_text("damaged\n")  # the run is no longer DONE
    log1 = (fold0 / "logs" / "fold_0.attempt_1.log").read_bytes()
    second = run_cli("run", str(cfg), "--workers", "1", "--results-root", str(root), env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    record = json.loads((fold0 / "status" / "fold_0.json").read_text())
    assert [(h["attempt"], h["outcome"]) for h in record["history"]] == [(1, "DONE"), (2, "DONE")]
    assert record["attempt"] == 2
    assert (fold0 / "logs" / "fold_0.attempt_1.log").read_bytes() == log1  # kept as it was
    assert b"hello from fold 0" in (fold0 / "logs" / "fold_0.attempt_2.log").read_bytes()
    meta = json.loads((fold0 / "fold_0" / "metadata.json").read_text())
    assert meta["attempt"] == 2
    assert not (fold0 / ".staging").exists()
    other = json.loads((fold0 / "status" / "fold_1.json").read_text())
    assert [h["attempt"] for h in other["history"]] == [1]  # fold 1 was DONE: not run again


def test_a_forged_refused_copy_of_a_running_message_does_not_end_its_group(
        fc: FaultCluster, tmp_path: Path) -> None:
    """A copy of a running fold's message (its chord included) naming an unregistered
    trainer is refused, and counts in no chord: the group still ends DONE, finalized once."""
    import base64

    cfg = experiment(tmp_path, "f_forged", seconds=3.5, folds=3)
    submit(fc, cfg)
    fc.wait_running("f_forged", n=1)
    raw = wait_for(lambda: next((json.loads(v)[0] for v in fc.client.hgetall("unacked").values()
                                 if b"f_forged" in base64.b64decode(json.loads(v)[0]["body"])), None),
                   timeout=30, what="a running message of f_forged")
    body = json.loads(base64.b64decode(raw["body"]))
    assert body[2]["chord"], "the genuine message carries its chord"
    body[0][0]["trainer"] = "os.system"
    raw["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    raw["headers"]["id"] = raw["properties"]["correlation_id"] = "forged-f-forged"
    raw["properties"]["delivery_tag"] = "forged-tag-f-forged"
    fc.client.rpush("cpu", json.dumps(raw))
    wait_for(lambda: any(json.loads(x).get("task_id") == "forged-f-forged"
                         for x in fc.client.lrange("orch:deadletters", 0, -1)),
             timeout=30, what="the forged message to be refused")
    audit(fc, "f_forged", folds=3)  # DONE, each fold committed once, finalize ran once


def test_a_message_whose_taker_died_before_starting_it_is_handed_on_before_the_grace(
        fc: FaultCluster, tmp_path: Path) -> None:
    """A worker took a message (it is in kombu's unacknowledged hash, stamped with the
    worker's name and pid) and died before its attempt claimed the run: no lease will
    lapse. The watchdog sees the taker gone from the registry and hands the message on
    10-12 s after delivery, not after the grace of three leases (30 s)."""
    import base64

    for name in ("cpu1", "cpu2"):  # no consumer: the message stays where this test puts it
        with_group_kill(fc.workers[name])
    cfg = experiment(tmp_path, "f_taken", seconds=0.5, folds=2)
    proc = submit(fc, cfg)
    assert proc.returncode == 0, proc.stderr
    raw = wait_for(lambda: pop_queued(fc, "cpu"), timeout=30, what="the run's message on the cpu queue")
    payload = json.loads(raw)
    payload["properties"]["orch_taker"] = ["ghost@nowhere", 4242]  # no such worker is up
    tag, info = payload["properties"]["delivery_tag"], payload["properties"]["delivery_info"]
    taken_at = time.time()
    with fc.client.pipeline() as pipe:  # what kombu's QoS.append writes at delivery
        pipe.zadd("unacked_index", {tag: taken_at})
        pipe.hset("unacked", tag, json.dumps([payload, info["exchange"], info["routing_key"]]))
        pipe.execute()
    fc.ensure_workers()
    fold = json.loads(base64.b64decode(payload["body"]))[0][0]["fold"]
    audit(fc, "f_taken", folds=2)  # DONE, committed once, finalized once, nothing left over
    took = reassigned_after(fc, "f_taken", fold, taken_at)
    print(f"started {took:.1f} s after its taker died")
    assert took < REASSIGN_LIMIT - 5, took  # the grace alone would take 30 s
    assert "delivered but never started" in fc.log("control")
    assert [h["outcome"] for h in _fold_record(fc, "f_taken", fold)["history"]] == ["DONE"]


def test_a_message_lost_between_the_pop_and_its_delivery_is_published_again(
        fc: FaultCluster, tmp_path: Path) -> None:
    """kombu pops a message (BRPOP) before it records it as unacknowledged: a worker that
    dies in between, or never reads the reply (cut off while it waited), loses it with no
    trace in Redis. Once nothing is queued and nothing of the experiment is in flight for
    two lease periods, the watchdog publishes its unfinished groups again from the status
    files: the lost fold runs once, the group is finalized once."""
    for name in ("cpu1", "cpu2"):
        with_group_kill(fc.workers[name])
    cfg = experiment(tmp_path, "f_lost", seconds=0.6, folds=2)  # (group ids differ by content)
    assert submit(fc, cfg).returncode == 0
    wait_for(lambda: pop_queued(fc, "cpu"), timeout=30, what="a message of f_lost to lose")  # gone, as in a dead worker's socket
    lost_at = time.time()
    fc.ensure_workers()
    st = audit(fc, "f_lost", folds=2, timeout=150)  # DONE, each fold committed once, finalized once
    assert "published again 1 runs in 1 groups" in fc.log("control"), fc.log("control")[-2000:]
    assert all(f["attempt"] == 1 for f in st["group_details"][0]["folds"])
    print(f"group done {time.time() - lost_at:.1f} s after the loss")
