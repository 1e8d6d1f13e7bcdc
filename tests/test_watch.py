"""`orchestrator watch`: the screen rendered from hand-built snapshots (no Redis), the
GPU memory a worker's heartbeat reports, and the real command in a real pseudo-terminal
(tmux, 80x24) on a real cluster: it shows the running runs, and quits on q and Ctrl-C
with the terminal restored."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster import gpu, registry
from orchestrator.cluster.local import spawn, stop_process
from orchestrator.views import dashboard
from orchestrator.views.dashboard import ExperimentRow, FailureRow, Snapshot, WorkerRow, frame_text

from .conftest import REPO, Cluster, cli_env, run_cli, wait_for
from .fake_nvml import FakeNVML

H100 = {"driver": "550.54.15", "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559,
                                         "memory_used_mb": 23118, "utilization": 97}]}


def snapshot(**changes: Any) -> Snapshot:
    now = time.time()
    snap = Snapshot(
        "redis://:***@head:6379/0", "/srv/results", now,
        experiments=[ExperimentRow("iris_sweep", 80, 41, 2, 0, 2, eta=95.0, submitted_at=now),
                     ExperimentRow("mnist_mlp_with_a_very_long_name", 40, 40, submitted_at=now - 100),
                     ExperimentRow("slow_demo", 10, 3, paused=True)],
        workers=[WorkerRow("gpu0@node-a", "cuda", 0, "busy", 1.0,
                           "iris_sweep/iris/lr=0.01,hidden=64/seed=42/fold=3", now - 125, 1,
                           {"epoch": 12, "train_loss": 0.43121, "t": now, "worker": "gpu0@node-a"},
                           memory_used_mb=23118, memory_total_mb=81559, utilization=97),
                 WorkerRow("gpu1@node-a", "cuda", 1, "idle", 1.0, memory_used_mb=4, memory_total_mb=81559),
                 WorkerRow("cpu1@node-b", "cpu", None, "busy", 2.0, "iris_sweep/iris/base/seed=0/fold=1",
                           now - 3, 1, {"step": 41}),
                 WorkerRow("cpu2@node-b", "cpu", None, "stale", 14.0),
                 WorkerRow("control@head", "control", None, "idle", 1.0)],
        failures=[FailureRow("iris_sweep", "iris_sweep/iris/lr=0.1,hidden=64/seed=42/fold=1",
                             "ValueError: deliberate failure on fold 1 of iris_sweep/iris/lr=0.1,hidden=64",
                             now - 30)],
        failed_total=2)
    for key, value in changes.items():
        object.__setattr__(snap, key, value)
    return snap


def lines_of(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def line_with(text: str, needle: str) -> str:
    found = [line for line in lines_of(text) if needle in line]
    assert found, f"no line with {needle!r} in:\n{text}"
    return found[0]


# --- rendering, no Redis --------------------------------------------------------

def test_frame_at_80_columns_shows_bars_counts_eta_workers_and_failures() -> None:
    text = frame_text(snapshot(), 80, 24)
    lines = lines_of(text)
    assert max(len(line) for line in lines) <= 80
    assert len(lines) <= 24
    assert lines[0].startswith("orchestrator watch redis://:***@head:6379/0")
    sweep = line_with(text, "iris_sweep ")
    assert re.search(r"41/80\s+2\s+2\s+1m35s$", sweep.rstrip()), sweep
    assert re.search(r"█+▓+▒+░+", sweep), sweep  # done, failed, running, pending
    assert line_with(text, "slow_demo").rstrip().endswith("PAUSED")
    assert line_with(text, "mnist_mlp_").rstrip().endswith("done")
    assert "mnist_mlp_with_a_very_long_name" not in text and "…" in line_with(text, "mnist_mlp_")
    gpu0 = line_with(text, "gpu0@node-a")
    assert "busy" in gpu0 and "fold=3" in gpu0 and "ep 12" in gpu0 and "0.4312" in gpu0
    assert "2m05s" in gpu0 and "22.6/79.6" in gpu0
    assert "0.0/79.6" in line_with(text, "gpu1@node-a")
    cpu1 = line_with(text, "cpu1@node-b")
    assert re.search(r"cpu1@node-b\s+cpu\s+busy\s+iris_sweep/\S*fold=1\s+step 41\s+3s", cpu1), cpu1
    assert re.search(r"cpu2@node-b\s+cpu\s+stale\s+no heartbeat 14s", text)
    assert re.search(r"control@head\s+ctl\s+idle", text)
    assert "RECENT FAILURES (2 failed runs)" in text
    failure = line_with(text, "ValueError: deliberate failure")
    assert "fold=1" in failure and failure.endswith("…")
    assert lines[-1].startswith("q quit")


def test_bar_shows_done_failed_running_and_pending_in_proportion() -> None:
    row = ExperimentRow("e", 10, done=3, failed=1, cancelled=1, running=2)
    assert dashboard.bar(row, 20).plain == "█" * 6 + "▓" * 4 + "▒" * 4 + "░" * 6
    assert dashboard.bar(row, 20, ascii_only=True).plain == "#" * 6 + "x" * 4 + ">" * 4 + "-" * 6
    one_of_many = ExperimentRow("e", 1000, done=0, running=1)
    assert dashboard.bar(one_of_many, 10).plain == "▒" + "░" * 9  # a running run always shows


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_narrow_and_wide_terminals_cut_lines_and_never_wrap(width: int) -> None:
    text = frame_text(snapshot(), width)
    lines = lines_of(text)
    assert max(len(line) for line in lines) <= width
    assert len(lines) == len(lines_of(frame_text(snapshot(), 200)))  # same lines: nothing wrapped
    assert "cpu1@node-b" in text and "slow_demo" in text


def test_a_short_terminal_cuts_sections_and_says_how_many_are_hidden() -> None:
    now = time.time()
    workers = [WorkerRow(f"cpu{i}@node", "cpu", None, "busy", 1.0, f"exp/iris/base/seed=0/fold={i}", now - 5, 1,
                         {"step": i}) for i in range(30)]
    text = frame_text(snapshot(workers=workers), 80, 24)
    assert len(lines_of(text)) <= 24
    shown = sum(1 for line in lines_of(text) if re.match(r"cpu\d+@node ", line))
    assert 5 <= shown < 30
    assert f"… and {30 - shown} more workers" in text
    assert "iris_sweep" in text and "RECENT FAILURES" in text


def test_no_experiments_no_workers_and_redis_unreachable_are_said() -> None:
    empty = snapshot(experiments=[], workers=[], failures=[], failed_total=0)
    text = frame_text(empty, 80, 24)
    assert "no experiments under /srv/results" in text
    assert "no live workers registered on redis://:***@head:6379/0" in text
    assert "RECENT FAILURES" not in text
    lost = snapshot(error="Redis unreachable at redis://:***@head:6379/0 (Connection refused), retrying",
                    error_since=time.time())
    text = frame_text(lost, 80, 24)
    assert "Redis unreachable at redis://:***@head:6379/0 (Connection refused), retrying" in text
    assert "iris_sweep" in text  # the last good read stays on screen


def test_eta_comes_from_the_rate_of_done_runs_over_the_watch_window() -> None:
    rates = dashboard.RateWindow(window=60)
    rates.observe("e", 0.0, 10)
    assert rates.eta("e", 40) is None  # one observation: no rate yet
    rates.observe("e", 10.0, 10)
    assert rates.eta("e", 40) is None  # nothing finished while watching
    rates.observe("e", 20.0, 20)  # 10 runs in 20 s
    assert rates.eta("e", 40) == pytest.approx(80.0)
    assert rates.eta("e", 0) == 0.0
    for t in range(30, 200, 10):  # stalled since: the window slides past the burst
        rates.observe("e", float(t), 20)
    assert rates.eta("e", 40) is None
    rates.observe("e", 200.0, 5)  # fewer done than before (resubmitted): start over
    assert list(rates.samples["e"]) == [(200.0, 5)]


def test_durations_run_names_and_progress_are_shortened_to_fit() -> None:
    assert [dashboard.duration(s) for s in (None, 5, 95, 605, 7300, 40 * 3600, 200 * 3600)] == \
        ["?", "5s", "1m35s", "10m", "2h01m", "40h", "8d"]
    name = "iris_sweep/iris/lr=0.01,hidden=64/seed=42/fold=3"
    assert dashboard.shorten(name, 80) == name
    assert dashboard.shorten(name, 27) == "iris_sweep/…/seed=42/fold=3"  # experiment, seed, fold
    assert dashboard.shorten(name, 26) == "iris_sweep/…/fold=3"
    assert dashboard.shorten(name, 12) == "iris…/fold=3"
    assert dashboard.shorten("a_very_long_experiment_name/iris/base/seed=0/fold=3", 20) == "a_very_long_…/fold=3"
    assert dashboard.describe_progress({"epoch": 3, "train_loss": 0.123456, "t": 1.0, "name": "x"}) == \
        "ep 3 train_loss=0.1235"
    assert dashboard.describe_progress({"epoch": 3, "train_loss": 0.123456}, 16) == "ep 3 tra…=0.1235"
    assert dashboard.describe_progress({"step": 7}) == "step 7"
    assert dashboard.first_line("\n  ValueError: boom\n  at line 2\n") == "ValueError: boom"


def test_a_gpu_workers_heartbeat_reports_its_memory_and_old_records_stay_readable() -> None:
    from tasks import fleet as worker_fleet

    record = registry.WorkerRecord("gpu0@h", "h", 1, 0, "cuda", ["gpu"], "idle", 0.0, 0.0)
    gpu.use_nvml(FakeNVML(H100))
    try:
        worker_fleet._gpu_usage(record)
        assert (record.gpu_memory_used_mb, record.gpu_memory_total_mb, record.gpu_utilization) == (23118, 81559, 97)
        gpu.use_nvml(FakeNVML({"driver": None}))
        worker_fleet._gpu_usage(record)  # the driver went away: unknown, not the old values
        assert (record.gpu_memory_used_mb, record.gpu_memory_total_mb) == (None, None)
    finally:
        gpu.use_nvml(None)
    old = {k: v for k, v in json.loads(record.to_json()).items() if not k.startswith("gpu_")}
    assert registry.WorkerRecord.from_json(json.dumps(old)).gpu_memory_total_mb is None


def test_the_collector_reads_redis_and_the_results_root_and_keeps_the_last_read_when_redis_goes(
        tmp_path: Path, write_experiment: Any) -> None:
    from orchestrator.cluster.local import start_redis
    from orchestrator.dispatch.manifest import write_manifest
    from orchestrator.execution.leases import ACTIVE
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand
    from orchestrator.experiment.plan import make_plan
    from orchestrator.livestate import LiveState
    from orchestrator.paths import Layout, atomic_write_json

    layout = Layout(tmp_path / "results")
    specs = {}
    for name in ("coll", "files_only"):
        exp = load_experiments([str(write_experiment(name, trainer="prior", datasets=["iris"], folds=4))])[0]
        plans = make_plan(layout, expand(exp))
        write_manifest(layout, exp, plans)
        specs[name] = [s for p in plans for s in p.specs]
    atomic_write_json(layout.paused_marker("coll"), {"paused_at": time.time(), "now": False})
    run = specs["coll"]
    proc, url = start_redis(tmp_path / "redis")
    try:
        client = dashboard.redis_client(url)
        live = LiveState(client)
        live.set_run("coll", run[0].run_id, "DONE")
        live.set_run("coll", run[1].run_id, "FAILED", error="ValueError: boom\nTraceback (most recent call last):")
        live.set_run("coll", run[2].run_id, "IN_PROGRESS", worker="cpu1@h")
        now = time.time()
        registry.register(client, registry.WorkerRecord("cpu1@h", "h", 1, None, "cpu", ["cpu"], "busy", now, now), 30)
        registry.register(client, registry.WorkerRecord("cpu2@h", "h", 2, None, "cpu", ["cpu"], "idle", now, now - 60), 30)
        client.hset(ACTIVE, run[2].run_id, json.dumps({"token": "t1", "worker": "cpu1@h", "name": run[2].name,
                                                       "experiment": "coll", "started": now - 5, "attempt": 1}))
        client.hset(ACTIVE, run[3].run_id, json.dumps({"token": None, "worker": "cpu1@h", "name": run[3].name,
                                                       "revoked_token": "t0"}))  # handed back: not running
        client.hset(ACTIVE, "other", json.dumps({"token": "t2", "worker": "gpu3@lost", "name": "x/y/fold=0",
                                                 "started": now - 50}))  # its worker has no record
        live.set_progress(run[2].run_id, {"name": run[2].name, "worker": "cpu1@h", "step": 7, "t": now})
        collector = dashboard.Collector(layout, client, url, heartbeat=5)
        snap = collector.collect()
        assert snap.error is None
        coll = next(e for e in snap.experiments if e.name == "coll")
        assert (coll.total, coll.done, coll.failed, coll.running, coll.paused, coll.eta) == (4, 1, 1, 1, True, None)
        files_only = next(e for e in snap.experiments if e.name == "files_only")
        assert (files_only.from_files, files_only.total, files_only.done) == (True, 4, 0)
        assert [(f.name, f.error) for f in snap.failures] == [(run[1].name, "ValueError: boom")]
        rows = {w.name: w for w in snap.workers}
        assert set(rows) == {"cpu1@h", "cpu2@h", "gpu3@lost"}
        assert (rows["cpu1@h"].state, rows["cpu1@h"].run, rows["cpu1@h"].progress["step"]) == ("busy", run[2].name, 7)
        assert rows["cpu1@h"].more_runs == 0  # the handed-back entry does not count
        assert rows["cpu2@h"].state == "stale" and rows["cpu2@h"].run is None
        assert rows["gpu3@lost"].state == "gone"
        text = frame_text(snap, 80, 24)
        assert re.search(r"gpu3@lost\s+\?\s+gone\s+x/y/fold=0\s+no worker record\s+50s", text), text
        assert "coll" in text and "PAUSED" in text and "step 7" in text and "no heartbeat 1m00s" in text

        live.set_run("coll", run[2].run_id, "DONE")
        again = collector.collect()
        coll = next(e for e in again.experiments if e.name == "coll")
        assert coll.done == 2 and coll.eta is not None and coll.eta > 0  # 1 run finished while watching
    finally:
        stop_process(proc)
    lost = collector.collect()
    assert lost.error is not None and lost.error.startswith(f"Redis unreachable at {url}")
    assert lost.experiments == again.experiments  # the last good read stays
    assert "Redis unreachable" in frame_text(lost, 80, 24)


# --- the command ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_watch_without_a_broker_or_with_an_unreachable_one_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("watch", "--once", env=cli_env(ORCH_RESULTS_ROOT=str(tmp_path)))
    assert proc.returncode == 2 and "no broker configured" in proc.stderr, proc.stderr
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli("watch", "--once", "--broker", url, env=cli_env(ORCH_RESULTS_ROOT=str(tmp_path)))
    assert proc.returncode == 3 and f"cannot reach Redis at {url}" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def gpu_cluster(running_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's cluster plus a GPU worker on a fake H100 (NVML faked, nothing is
    routed to it): its heartbeat carries the GPU's memory."""
    folder = tmp_path_factory.mktemp("fake-gpu")
    machine = folder / "h100.json"
    machine.write_text(json.dumps(H100))
    env = running_cluster.env(ORCH_PRELOAD="0", ORCH_NVML_MODULE="tests.fake_nvml", ORCH_FAKE_NVML=str(machine))
    proc = spawn([sys.executable, "-m", "orchestrator", "worker", "--gpu", "0", "--name", "gpu0@%h"],
                 env, folder / "gpu0.log")
    client = registry.client(running_cluster.url)
    try:
        wait_for(lambda: any(r.name.startswith("gpu0@") for r in registry.list_workers(client)),
                 timeout=60, what="the fake GPU worker to register")
        yield running_cluster
    finally:
        stop_process(proc)


class Tmux:
    """A tmux server of our own (its own socket), one 80x24 window."""

    def __init__(self, name: str):
        self.base = ["tmux", "-u", "-L", name, "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True, timeout=10).stdout

    def start(self, script: Path) -> None:
        self("new-session", "-d", "-x", "80", "-y", "24", "-s", "w", f"bash {shlex.quote(str(script))}")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "w")

    def wait_screen(self, check: Any, what: str, timeout: float = 30) -> str:
        """The screen, once `check(screen)` is true."""
        def ready() -> str | None:
            screen = self.screen()
            return screen if check(screen) else None
        return str(wait_for(ready, timeout=timeout, what=what))

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


def watch_script(path: Path, env: dict[str, str], *args: str) -> Path:
    """Runs `orchestrator watch` in the pane; then says whether the terminal settings are
    the ones from before and the exit code, and waits (so the pane stays readable)."""
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()
                        if k not in ("COLUMNS", "LINES") and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
    path.write_text(f"""{exports}
unset COLUMNS LINES
export LANG=C.UTF-8 LC_ALL=C.UTF-8
trap 'true' INT
cd {shlex.quote(str(REPO))}
before=$(stty -g)
{shlex.quote(sys.executable)} -m orchestrator watch {' '.join(shlex.quote(a) for a in args)}
rc=$?
after=$(stty -g)
if [ "$before" = "$after" ]; then echo "tty restored"; else echo "tty NOT restored"; fi
echo "watch exited $rc"
exec sleep 300
""")
    return path


def test_watch_in_a_real_terminal_shows_running_runs_and_quits_on_q_and_ctrl_c(
        gpu_cluster: Cluster, write_experiment: Any, tmp_path: Path) -> None:
    name = "watched_exp"
    cfg = write_experiment(name, trainer="slow", datasets=["iris"], folds=4,
                           params={"seconds": 6.0}, resources={"gpus": 0})
    proc = run_cli("submit", str(cfg), env=gpu_cluster.env())
    assert proc.returncode == 0, proc.stderr

    tmux = first = Tmux(f"orch-watch-{time.monotonic_ns()}")
    try:
        tmux.start(watch_script(tmp_path / "watch.sh", gpu_cluster.env(), "--interval", "0.5"))
        busy = re.compile(r"cpu[12]@\S*\s+cpu\s+busy\s+\S*fold=\d\s+step \d+")
        screen = tmux.wait_screen(lambda s: busy.search(s) and name in s, timeout=40,
                                  what="the screen to show a run training on cpu1 or cpu2 with its step")
        lines = lines_of(screen)
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
        assert re.search(rf"{name}\s+[█▓▒░]+\s+\d+/4\s", screen), screen
        assert re.search(r"gpu0@\S*\s+0\s+idle.*22\.6/79\.6", screen), screen  # heartbeat's GPU memory
        assert re.search(r"control@\S*\s+ctl\s+idle", screen), screen
        tmux("send-keys", "-t", "w", "q")
        after = tmux.wait_screen(lambda s: "watch exited" in s, timeout=15, what="watch to exit on q")
        assert "tty restored" in after and "watch exited 0" in after, after
        assert "orchestrator watch" not in after  # the alternate screen is gone

        tmux = Tmux(f"orch-watch-{time.monotonic_ns()}")  # a fresh terminal
        tmux.start(watch_script(tmp_path / "watch2.sh", gpu_cluster.env(), name))
        tmux.wait_screen(lambda s: name in s and "q quit" in s, what="the screen of the second watch")
        tmux("send-keys", "-t", "w", "C-c")
        after = tmux.wait_screen(lambda s: "watch exited" in s, timeout=15, what="watch to exit on Ctrl-C")
        assert "tty restored" in after and "watch exited 0" in after, after
        assert "Traceback" not in after
    finally:
        first.kill()
        tmux.kill()

    once = run_cli("watch", name, "--once", env=gpu_cluster.env(COLUMNS="80"))
    assert once.returncode == 0, once.stderr
    assert max(len(line) for line in lines_of(once.stdout)) <= 80
    assert re.search(rf"{name}\s+\S+\s+\d+/4\s", once.stdout), once.stdout
    piped = subprocess.run([sys.executable, "-m", "orchestrator", "watch", name], cwd=REPO,
                           env=gpu_cluster.env(COLUMNS="80"), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and name in piped.stdout and "not a terminal" in piped.stderr, piped.stderr
    unknown = run_cli("watch", "no_such_exp", "--once", env=gpu_cluster.env())
    assert unknown.returncode == 2 and "no experiment 'no_such_exp'" in unknown.stderr, unknown.stderr
