"""Two worker hosts for real: each in its own network namespace, joined to the Redis host
by a veth pair, so that cutting a host's link is a network partition and not a pause.

Topology (tests/netns.py makes it; every address lives inside a namespace this test
creates; none in the root namespace, nothing is sent anywhere else):

    orchmh-hub  bridge orchmhbr0 10.213.0.1/24: redis-server, the control worker
                (watchdog, chord callbacks) and the submitting CLI
    orchmh-a    eth0 10.213.0.11/24 <-veth-> orchmh-a0 on the hub's bridge: worker cpu@orchmh-hosta
    orchmh-b    eth0 10.213.0.12/24 <-veth-> orchmh-b0 on the hub's bridge: worker cpu@orchmh-hostb

The results root is shared the way a network filesystem would be: namespaces share the
filesystem. This process reads Redis through its unix socket (also on that filesystem),
so it needs no address of its own.

Each worker host also has its own UTS namespace (hostname orchmh-hosta / orchmh-hostb):
attempts record `socket.gethostname()`, and an attempt that finds its run held by a
process of *its own host* checks that pid and takes a dead one over at once
(orchestrator.execution.attempt `wait_for_holder`). With the hostname shared, host B would look
up host A's pid in its own process table; with distinct hostnames (as on real hosts)
that path is never taken across hosts and the run is handed on by the watchdog only,
which is the path under test. (The pid namespace stays shared: this test signals the
workers' process groups.)

A link is cut on the hub's side (`ip link set orchmh-a0 down`), as when a switch port
or a cable dies: the host's interface loses its carrier, what it sends on its open
connections vanishes without an error (a call waits for its socket timeout), and a new
connection fails once ARP gives up ("No route to host"). Taking the host's own interface
down instead would answer "network unreachable" at once, an easier case.

Two scenarios, each with the run of fold 0 on one host and the other host free:
the link comes back while the successor still trains, or only after it committed and
the group was finalized (the cut then lasts 40 s: longer than any Redis call of the
cut-off worker blocks, and than kombu's socket timeout). Either way the cut-off worker
must write nothing once the run was handed on: checked on the disk itself (inotify on
every folder, snapshots of every file's inode, mtime and bytes, the folder list, and a
poll for the cut-off attempt's own staging folder), then test_faults' audit.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.cluster.local import spawn

from .conftest import REPO, cli_env, wait_for
from .netns import Host, Network, in_netns
from .test_faults import (
    FREE_SLOT_LIMIT,
    REASSIGN_LIMIT,
    FaultCluster,
    _fold_record,
    audit,
    experiment,
    fold_of,
    reassigned_after,
    snapshot,
    the_run,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

NET = Network(
    hub="orchmh-hub", bridge="orchmhbr0", hub_addr="10.213.0.1",
    hosts={"hosta": Host("orchmh-a", "orchmh-hosta", "orchmh-a0", "10.213.0.11"),
           "hostb": Host("orchmh-b", "orchmh-hostb", "orchmh-b0", "10.213.0.12")},
    lock=Path("/tmp/orchmh.lock"))
HUB = NET.hub
REDIS_ADDR = NET.hub_addr
REDIS_PORT = 6400
CUT_LATE = 40.0  # seconds a link stays cut in the "back after the commit" scenario
HOSTS = NET.hosts


class MultiHostCluster(FaultCluster):
    """FaultCluster's Redis and workers, placed in the namespaces of `net` (a worker per
    host of `workers`, `cpu@<hostname>`, and a control worker in the hub). `url` (what the
    test_faults helpers hand to `orchestrator status`) is Redis's unix socket; the workers
    and the submitting CLI use `tcp_url`, across the veths and the bridge."""

    def __init__(self, base: Path, net: Network = NET, workers: tuple[str, ...] | None = None,
                 **env: str):
        super().__init__(base)
        self.client.close()
        self.net = net
        self.names = (*(workers if workers is not None else net.hosts), "control")
        self.extra_env = env
        self.port = REDIS_PORT
        self.socket = base / "redis.sock"
        self.url = f"unix://{self.socket}?db=0"
        self.tcp_url = f"redis://{net.hub_addr}:{REDIS_PORT}/0"
        self.client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
        self.cut_off: set[str] = set()

    def host_env(self) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.tcp_url, ORCH_RESULTS_ROOT=str(self.root), **self.extra_env)

    def start_redis(self, persist: bool = False) -> None:
        exe = shutil.which("redis-server")
        assert exe
        data = self.base / "redis"
        data.mkdir(exist_ok=True)
        argv = [exe, "--port", str(REDIS_PORT), "--bind", self.net.hub_addr, "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                # No password: the bridge is this test's own, nothing else can reach it.
                "--protected-mode", "no", "--dir", str(data), "--save", "",
                "--appendonly", "yes" if persist else "no", "--maxmemory-policy", "noeviction",
                "--logfile", str(data / "redis.log")]
        self.redis_proc = spawn(in_netns(self.net.hub, argv), dict(os.environ), data / "redis.out")
        wait_for(self._redis_up, timeout=20, what="redis-server (in the hub namespace) to answer")

    def start_worker(self, name: str) -> None:
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
        if name == "control":
            argv = in_netns(self.net.hub, [*base, "--control"])
        else:
            host = self.net.hosts[name]
            argv = in_netns(host.netns, [*base, "--cpu", "--accept-gpu-runs", "--name", "cpu@%h"],
                            hostname=host.hostname)
        self.workers[name] = spawn(argv, self.host_env(), self.logs / f"{name}.log")
        self.starts[name] = self.starts.get(name, 0) + 1

    def ensure_workers(self) -> None:
        for name in list(self.cut_off):
            self.restore(name)
        for name in self.names:
            proc = self.workers.get(name)
            if proc is None or proc.poll() is not None:
                self.start_worker(name)
        wait_for(lambda: all(self.log(n).count("ready.") >= self.starts[n] for n in self.names),
                 timeout=90, what="workers to be ready")

    def worker_named(self, node: str) -> str:
        """cpu@orchmh-hosta -> hosta"""
        hostname = node.split("@")[-1]
        return next(name for name, h in self.net.hosts.items() if h.hostname == hostname)

    def node(self, name: str) -> str:
        return f"cpu@{self.net.hosts[name].hostname}"

    def cut(self, name: str) -> None:
        self.cut_off.add(name)
        self.net.set_link(self.net.hosts[name], up=False)

    def restore(self, name: str) -> None:
        self.net.set_link(self.net.hosts[name], up=True)
        self.cut_off.discard(name)

    def submit(self, cfg: Path) -> None:
        """`orchestrator submit` from the hub (it reaches Redis throughout)."""
        argv = in_netns(self.net.hub, [sys.executable, "-m", "orchestrator", "submit", str(cfg)])
        proc = subprocess.run(argv, cwd=REPO, env=self.host_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostCluster]:
    with NET.owned("multi-host test"):
        c = MultiHostCluster(tmp_path_factory.mktemp("multihost"))
        try:
            c.start_redis()
            c.ensure_workers()
            yield c
        finally:
            c.stop()


@pytest.fixture
def mh(cluster: MultiHostCluster) -> MultiHostCluster:
    cluster.ensure_workers()
    return cluster


# --- what the disk saw -------------------------------------------------------------------

def folders(root: Path) -> set[str]:
    """Every folder under `root` (test_faults.snapshot sees files only: an empty folder
    left behind, such as a `.staging/`, shows here)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


def changes(before: dict[str, Any], after: dict[str, Any], appended: set[str]) -> list[str]:
    """What differs between two snapshots, except files in `appended` that only grew at
    their end (same inode, old bytes a prefix of the new)."""
    found = []
    for name in sorted(before.keys() | after.keys()):
        if name not in before:
            found.append(f"created {name}")
        elif name not in after:
            found.append(f"removed {name}")
        elif before[name] != after[name]:
            (ino0, _, data0), (ino1, _, data1) = before[name], after[name]
            if not (name in appended and ino0 == ino1 and data1.startswith(data0)):
                found.append(f"changed {name}")
    return found


class DiskWatch:
    """inotify on every folder under `root`, read by a thread: every change any process
    makes there from now on, also one it undoes at once (a staging folder written, then
    removed), which no before/after snapshot can see. A folder created meanwhile is
    watched as soon as its creation is read (what was written in it before is missed)."""

    MASK = {0x2: "modified", 0x4: "attributes changed", 0x8: "closed after writing",
            0x40: "moved out", 0x80: "moved in", 0x100: "created", 0x200: "deleted",
            0x400: "folder deleted", 0x800: "folder moved"}
    FOLDER_CREATED = 0x40000100  # IN_ISDIR | IN_CREATE

    def __init__(self, root: Path):
        self.root = root
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            if self.add(folder) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self.seen: list[tuple[str, str]] = []  # (path under root, what happened)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def add(self, folder: Path) -> int:
        wd = int(self.libc.inotify_add_watch(self.fd, bytes(folder), sum(self.MASK)))
        if wd >= 0:
            self.folders[wd] = folder
        return wd

    def _loop(self) -> None:
        while not self.done.is_set():
            if select.select([self.fd], [], [], 0.05)[0]:
                self._read()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            at = 0
            while at < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, at)
                name = data[at + 16:at + 16 + size].rstrip(b"\0").decode()
                at += 16 + size
                folder = self.folders.get(wd)
                if folder is None:
                    continue
                path = str((folder / name).relative_to(self.root)) if name else str(folder.relative_to(self.root))
                what = ", ".join(v for k, v in self.MASK.items() if mask & k)
                if what:
                    self.seen.append((path, what))
                if mask & self.FOLDER_CREATED == self.FOLDER_CREATED:
                    self.add(folder / name)

    def stop(self) -> list[tuple[str, str]]:
        """Everything seen until now; the watch ends."""
        self.done.set()
        self.thread.join(timeout=5)
        self._read()
        os.close(self.fd)
        return self.seen


class Appears:
    """Whether `path` ever exists while watched: polled every 5 ms by a thread (a folder
    an attempt writes and a successor or finalize removes lives for seconds)."""

    def __init__(self, path: Path):
        self.path = path
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(0.005):
            if os.path.lexists(self.path):
                self.last = time.time()
                self.first = self.first or self.last

    def stop(self) -> tuple[float, float] | None:
        """(first, last) time it was seen, or None."""
        self.done.set()
        self.thread.join(timeout=5)
        return None if self.first is None or self.last is None else (self.first, self.last)


def writes_except(seen: list[tuple[str, str]], appended: set[str]) -> list[str]:
    """The changes seen, except writes to the files in `appended` (their appends)."""
    return sorted({f"{path}: {what}" for path, what in seen
                   if not (path in appended and what in ("modified", "closed after writing"))})


# --- the scenario ------------------------------------------------------------------------

@dataclass
class Cut:
    run_id: str
    task_id: str
    fold: int
    victim: str  # the host whose link was cut
    other: str
    token: str  # the cut-off attempt's
    cut_at: float
    gave_up_before: int  # "stops without writing" lines in the victim's log before the cut

    def log(self, attempt: int) -> str:
        """An attempt's log, under the experiment's folder."""
        return f"iris/base/seed=0/logs/fold_{self.fold}.attempt_{attempt}.log"


def cut_the_running_host(mh: MultiHostCluster, name: str) -> Cut:
    run_id, entry = the_run(mh, name)
    victim = mh.worker_named(entry["worker"])
    other = next(h for h in HOSTS if h != victim)
    cut = Cut(run_id, entry["task_id"], fold_of(mh, name, run_id), victim, other, entry["token"], 0.0,
              mh.log(victim).count("stops without writing"))
    cut.cut_at = time.time()
    mh.cut(victim)
    return cut


def successor_training(mh: MultiHostCluster, name: str, cut: Cut) -> dict[str, Any]:
    """Waits until the other host trains the run (a new attempt holds it)."""
    def taken() -> dict[str, Any] | None:
        e = mh.active(name).get(cut.run_id)
        return e if e and e["token"] != cut.token and e["worker"] == mh.node(cut.other) else None

    return wait_for(taken, timeout=REASSIGN_LIMIT + 15, what="the other host to take the run over")


def gave_up(mh: MultiHostCluster, cut: Cut, timeout: float = 45) -> float:
    """Waits until the cut-off worker, reconnected, has ended its attempt (the line it logs
    after its last action of it); returns when that was seen."""
    deadline = time.monotonic() + timeout
    while mh.log(cut.victim).count("stops without writing") <= cut.gave_up_before:
        if time.monotonic() > deadline:
            pytest.fail(f"the cut-off worker never said it stopped its attempt within {timeout} s of "
                        f"reconnecting; its log ends:\n{mh.log(cut.victim)[-4000:]}")
        time.sleep(0.1)
    return time.time()


def settled_as_the_successors(mh: MultiHostCluster, name: str, cut: Cut) -> None:
    """Once the cut-off worker gave up: the group is final and the run is the successor's,
    on disk and in Redis, committed once; the cut-off host's worker lives on."""
    st = audit(mh, name)  # DONE, committed == 1, metadata's attempt == status's, no .staging/.tmp
    took = reassigned_after(mh, name, cut.fold, cut.cut_at)
    print(f"{name}: restarted on {cut.other} {took:.1f} s after {cut.victim}'s link was cut")
    assert took < FREE_SLOT_LIMIT, took
    record = _fold_record(mh, name, cut.fold)
    assert record["attempt"] == 2, record
    assert [h["outcome"] for h in record["history"]] == ["LOST", "DONE"], record["history"]
    assert record["worker"] == mh.node(cut.other), record
    fold = st["group_details"][0]["folds"][cut.fold]
    meta = json.loads(Path(fold["files"]["metadata.json"]).read_text())
    assert meta["attempt"] == record["attempt"] == fold["attempt"] == 2, (meta["attempt"], fold)
    assert meta["worker"] == mh.node(cut.other) and meta["host"] == HOSTS[cut.other].hostname, meta
    assert mh.client.hget(f"orch:attempts:{cut.run_id}", "committed") == b"1"
    assert mh.workers[cut.victim].poll() is None, "the cut-off worker died"


def its_staging(mh: MultiHostCluster, name: str, cut: Cut) -> Path:
    """The cut-off attempt's own staging folder (runner: `.staging/fold_<i>.<token>`)."""
    return mh.root / name / "iris/base/seed=0/.staging" / f"fold_{cut.fold}.{cut.token}"


def no_staging_after_it_was_superseded(seen: tuple[float, float] | None, cut: Cut, superseded: float,
                                      mh: MultiHostCluster) -> None:
    assert seen is None, (
        f"the cut-off attempt wrote its staging folder after the run was handed on: seen from "
        f"{seen[0] - superseded:+.1f} s to {seen[1] - superseded:+.1f} s after the successor started "
        f"(link cut at {cut.cut_at - superseded:+.1f} s); its log ends:\n{mh.log(cut.victim)[-2500:]}")


def test_link_back_while_the_successor_trains(mh: MultiHostCluster, tmp_path: Path) -> None:
    """The cut-off host's attempt learns it was superseded as soon as it reaches Redis
    again, stops its trainer and writes nothing, while the other host still trains."""
    name = "mh_back_early"
    # Long enough that the successor (started ~12 s after the cut) still trains when the
    # cut-off worker has given up, and that the cut-off trainer is still training then.
    mh.submit(experiment(tmp_path, name, seconds=24, short_fold=1))
    cut = cut_the_running_host(mh, name)
    try:
        successor_training(mh, name, cut)
        superseded = time.time()
        spy = Appears(its_staging(mh, name, cut))
        before, dirs = snapshot(mh.root / name), folders(mh.root / name)
        watch = DiskWatch(mh.root / name)
    finally:
        mh.restore(cut.victim)
    back_at = time.time()
    try:
        gave_up_at = gave_up(mh, cut)
        after = snapshot(mh.root / name)
    finally:
        seen, staged = watch.stop(), spy.stop()
    print(f"{name}: the cut-off worker gave up {gave_up_at - back_at:.1f} s after its link came back")
    record = _fold_record(mh, name, cut.fold)
    assert record["status"] == "IN_PROGRESS" and record["attempt"] == 2, \
        ("the successor must still be training for this test to mean anything", record)
    # Only the two attempts' own logs may grow (the successor's as it trains).
    logs = {cut.log(1), cut.log(2)}
    assert writes_except(seen, logs) == []
    assert changes(before, after, appended=logs) == []
    assert folders(mh.root / name) == dirs
    no_staging_after_it_was_superseded(staged, cut, superseded, mh)
    settled_as_the_successors(mh, name, cut)
    # The cut-off worker's give-up did not put the run's message back on the queue: a
    # third delivery would hold a worker slot until the successor ends.
    received = f"Task tasks.train_run[{cut.task_id}] received"
    deliveries = {h: mh.log(h).count(received) for h in HOSTS}
    assert sum(deliveries.values()) == 2, (
        f"the run's message was delivered {deliveries}: the cut-off worker's hand-back requeued "
        f"it while the successor held it (kombu restores by delivery tag)")


def test_link_back_after_the_successor_committed(mh: MultiHostCluster, tmp_path: Path) -> None:
    """The cut-off host reconnects after the run was committed and its group finalized;
    its trainer ended during the cut, after the run was handed on: it is fenced for
    good, and writes nothing, neither then nor once it is back."""
    name = "mh_back_late"
    mh.submit(experiment(tmp_path, name, seconds=14, short_fold=1))
    cut = cut_the_running_host(mh, name)
    try:
        successor_training(mh, name, cut)
        superseded = time.time()
        spy = Appears(its_staging(mh, name, cut))
        audit(mh, name)  # committed by the other host, finalized
        before, dirs = snapshot(mh.root / name), folders(mh.root / name)
        watch = DiskWatch(mh.root / name)
        # A partition longer than one Redis call of the cut-off worker can block (10 s
        # socket timeout, then reconnects of 5 s each) and than kombu's socket timeout
        # (30 s): its trainer's progress report gives up and the trainer ends while cut off.
        wait_for(lambda: time.time() > cut.cut_at + CUT_LATE, timeout=CUT_LATE + 5,
                 what="the partition to last")
    finally:
        mh.restore(cut.victim)
    back_at = time.time()
    try:
        gave_up_at = gave_up(mh, cut)
        after = snapshot(mh.root / name)
    finally:
        seen, staged = watch.stop(), spy.stop()
    print(f"{name}: the cut-off worker gave up {gave_up_at - back_at:.1f} s after its link came back")
    # After the commit: nothing at all, but the cut-off attempt's own log growing.
    assert writes_except(seen, {cut.log(1)}) == []
    assert changes(before, after, appended={cut.log(1)}) == []
    assert folders(mh.root / name) == dirs
    # Nor between the hand-over and the commit (a staging folder that the successor or
    # the group's finalize would remove again).
    no_staging_after_it_was_superseded(staged, cut, superseded, mh)
    settled_as_the_successors(mh, name, cut)
