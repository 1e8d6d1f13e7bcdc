#!/usr/bin/env python
"""Dispatch overhead of the orchestrator versus a raw Celery chord.

    python benchmarks/dispatch.py [--runs 1000] [--folds 5] [--repeat 1] [--tmp-dir DIR]

A  `orchestrator run EXP --workers 2`, end to end (own redis-server, 2 CPU workers and a
   control worker, submit, wait, summary, shutdown).
B  warm cluster: redis-server + 2 CPU workers + 1 control worker already running and
   answering pings; time `orchestrator submit EXP --wait` from start to exit.
C  raw Celery on the same redis-server (another database number, so the queues do not
   mix) and the same worker flags and celeryconfig: one chord of `runs` no-op tasks
   with a no-op body, from building the canvas to the body's result.
C5 like C, but shaped like the orchestrator's canvas: runs/folds chords of `folds`
   no-op tasks each, waiting for every body.

The trainer is `prior` (near-zero cost), so B - C is the orchestrator's own overhead.
With --repeat N, B, C and C5 are measured N times, alternately; medians are printed.
Every process started here runs in its own process group and is stopped at the end,
also on errors and Ctrl-C; temporary folders are removed (unless --keep).
B's cost depends on the filesystem of the temporary folder (the results root is in
it): each run creates about ten files and folders and fsyncs its outputs. On an ext4
without a journal, creating a file right after many were deleted nearby (other test
runs in /tmp) costs up to a millisecond of kernel time; --tmp-dir puts it elsewhere.
Exit status: 0 when everything ran and checked out, 1 when something broke, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.trees import compile_tree  # noqa: E402
from orchestrator.cluster.local import spawn, start_redis, stop_process  # noqa: E402
from orchestrator.cluster.spawning import die_with_parent  # noqa: E402

# ORCH_* variables that point a process at a cluster: every child gets them explicitly.
CLUSTER_VARS = ("ORCH_BROKER_URL", "ORCH_RESULT_BACKEND", "ORCH_STATE_URL", "ORCH_RESULTS_ROOT")
NOOP_PRIORITY = 9 - 5  # what orchestrator.dispatch.canvas.message_priority gives the default priority 5
NOOP_QUEUE = "gpu"  # the queue of a run with default resources (gpus: 1)


class BenchmarkError(RuntimeError):
    """Something broke: the benchmark exits 1 with this message."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cluster_env(url: str, results_root: Path, **extra: str) -> dict[str, str]:
    return base_env(ORCH_BROKER_URL=url, ORCH_RESULT_BACKEND=url, ORCH_STATE_URL=url,
                    ORCH_RESULTS_ROOT=str(results_root), **extra)


# -- processes ----------------------------------------------------------------------
class Procs:
    """Every long-lived child of the benchmark (redis, workers), stopped in one place."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str], logfile: Path, cwd: Path = REPO) -> None:
        # orchestrator.cluster.local.spawn: own session (process group) + SIGTERM if we die.
        here = os.getcwd()
        os.chdir(cwd)  # spawn() has no cwd argument; the children inherit ours
        try:
            self.items[name] = (spawn(argv, env, logfile), logfile)
        finally:
            os.chdir(here)

    def add(self, name: str, proc: subprocess.Popen[bytes], logfile: Path) -> None:
        self.items[name] = (proc, logfile)

    def cpu(self, names: list[str], kernel: bool = False) -> dict[str, float]:
        """CPU seconds (user + system, or system only) used so far by each named process
        and its children."""
        return {n: cpu_seconds(self.items[n][0].pid, kernel) for n in names}

    def check(self, names: list[str]) -> None:
        for n in names:
            proc, logfile = self.items[n]
            if proc.poll() is not None:
                raise BenchmarkError(f"{n} exited with status {proc.returncode}; its log ends:\n"
                                     f"{tail(logfile)}")

    def stop(self, names: list[str] | None = None) -> None:
        """SIGTERM the process groups (in parallel), SIGKILL after a grace period."""
        names = [n for n in (names or list(self.items)) if n in self.items]
        workers = [n for n in names if n != "redis"]
        threads = [threading.Thread(target=stop_process, args=(self.items[n][0], signal.SIGTERM, 20.0))
                   for n in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if "redis" in names:
            stop_process(self.items["redis"][0], signal.SIGTERM, 5.0)
        for n in names:
            self.items.pop(n, None)


def cpu_seconds(pid: int, kernel: bool = False) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in family:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.system + t.children_system + (0.0 if kernel else t.user + t.children_user)
    return total


def children_cpu() -> float:
    """CPU seconds of every child this process has waited for (and of their waited children)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Timed:
    """A command timed from Popen to exit; its merged output lines with arrival times."""

    argv: list[str]
    env: dict[str, str]
    logfile: Path
    timeout: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    elapsed: float = 0.0
    returncode: int = 0
    wall_start: float = 0.0
    proc: subprocess.Popen[bytes] | None = None

    def run(self) -> Timed:
        timed_out = threading.Event()
        self.wall_start = time.time()
        t0 = time.monotonic()
        self.proc = proc = subprocess.Popen(
            self.argv, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGTERM))

        def reader() -> None:
            assert proc.stdout is not None
            with open(self.logfile, "w") as fh:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip("\n")
                    self.lines.append((time.monotonic() - t0, line))
                    fh.write(f"{self.lines[-1][0]:9.3f} {line}\n")
                    fh.flush()

        def watchdog() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        timer = threading.Timer(self.timeout, watchdog)
        timer.start()
        try:
            self.returncode = proc.wait()  # blocking waitpid: exact exit time
            self.elapsed = time.monotonic() - t0
        except BaseException:
            # Ctrl-C: the child runs in its own session, so stop it ourselves; it stops
            # anything it started (orchestrator run handles SIGTERM).
            stop_process(proc, signal.SIGTERM, grace=30)
            raise
        finally:
            timer.cancel()
        rt.join(timeout=10)
        if timed_out.is_set():
            raise BenchmarkError(f"{' '.join(self.argv[:4])} ... ran past {self.timeout:.0f} s; "
                                 f"output ends:\n{self.output()[-2000:]}")
        return self

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)

    def last(self, prefix: str) -> float | None:
        found = [t for t, line in self.lines if line.startswith(prefix)]
        return found[-1] if found else None


# -- the experiment -----------------------------------------------------------------
def write_experiment(path: Path, name: str, points: int, folds: int) -> None:
    values = [round(0.001 * (i + 1), 6) for i in range(points)]
    path.write_text(
        f"# written by benchmarks/dispatch.py\n"
        f"experiment: {name}\n"
        f"trainer: prior\n"
        f"datasets: [iris]\n"
        f"folds: {folds}\n"
        f"holdout: 0.2\n"
        f"seeds: [0]\n"
        f"sweep:\n"
        f"  grid:\n"
        f"    smoothing: {json.dumps(values)}\n")


def verify_results(root: Path, experiment: str, runs: int, groups: int) -> None:
    """final_results.csv has one row per run; every group's status.json says DONE."""
    final = root / experiment / "final_results.csv"
    if not final.exists():
        raise BenchmarkError(f"{final} does not exist")
    with open(final, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != runs or len({r["run_id"] for r in rows}) != runs:
        raise BenchmarkError(f"{final} has {len(rows)} rows ({len({r['run_id'] for r in rows})} "
                             f"distinct run ids), expected {runs}")
    statuses = list((root / experiment).glob("**/status/status.json"))
    not_done = []
    for path in statuses:
        data = json.loads(path.read_text())
        if data.get("train_status") != "DONE":
            not_done.append(f"{path}: {data.get('train_status')} {data.get('failed') or ''}")
    if len(statuses) != groups or not_done:
        raise BenchmarkError(f"{len(statuses)} status.json files (expected {groups}); not DONE: "
                             + ("; ".join(not_done[:5]) or "none"))


def timeline(root: Path, experiment: str, wall_start: float) -> dict[str, Any]:
    """Where the time of one orchestrator submission went, from the status files."""
    folds: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    for status_dir in (root / experiment).glob("**/status"):
        fold_end = []
        for path in status_dir.glob("fold_*.json"):
            d = json.loads(path.read_text())
            folds.append(d)
            fold_end.append(d["finished_at"])
        g = json.loads((status_dir / "status.json").read_text())
        groups.append({"finished_at": g["finished_at"], "last_fold": max(fold_end)})
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for d in folds:
        by_worker.setdefault(d.get("worker") or "?", []).append(d)
    gaps: list[float] = []
    busy: dict[str, float] = {}
    first_run: dict[str, float] = {}
    for w, items in by_worker.items():
        items.sort(key=lambda d: d["started_at"])
        busy[w] = sum(d["finished_at"] - d["started_at"] for d in items)
        first_run[w] = items[0]["finished_at"] - items[0]["started_at"]
        gaps += [b["started_at"] - a["finished_at"] for a, b in zip(items, items[1:], strict=False)]
    in_task = [d["finished_at"] - d["started_at"] for d in folds]
    lag = [g["finished_at"] - g["last_fold"] for g in groups]
    return {
        "first_start": min(d["started_at"] for d in folds) - wall_start,
        "last_fold_end": max(d["finished_at"] for d in folds) - wall_start,
        "last_group_end": max(g["finished_at"] for g in groups) - wall_start,
        "runs_per_worker": {w: len(v) for w, v in sorted(by_worker.items())},
        "busy_per_worker": dict(sorted(busy.items())),
        "first_run_per_worker": dict(sorted(first_run.items())),
        "in_task_median": statistics.median(in_task),
        "in_task_mean": statistics.fmean(in_task),
        "gap_median": statistics.median(gaps) if gaps else 0.0,
        "gap_mean": statistics.fmean(gaps) if gaps else 0.0,
        "finalize_lag_median": statistics.median(lag),
        "finalize_lag_max": max(lag),
    }


# -- measurements -------------------------------------------------------------------
def measure_a(args: argparse.Namespace, tmp: Path, points: int, runs: int) -> dict[str, Any]:
    work = tmp / "a"
    work.mkdir()
    exp = "dispatch_bench_a"
    write_experiment(work / "exp.yaml", exp, points, args.folds)
    root = work / "results"
    argv = [sys.executable, "-m", "orchestrator", "run", str(work / "exp.yaml"),
            "--results-root", str(root), "--workers", "2"]
    log("A: " + " ".join(argv[1:]))
    cpu0 = children_cpu()
    t = Timed(argv, base_env(), work / "run.out", args.timeout).run()
    cpu_total = children_cpu() - cpu0  # `run` waits for its redis and workers: all included
    if t.returncode != 0:
        raise BenchmarkError(f"A: orchestrator run exited {t.returncode}; output ends:\n{t.output()[-3000:]}")
    verify_results(root, exp, runs, points)
    r = {"elapsed": t.elapsed, "cluster_started": t.first("local mode:"),
         "submitted": t.first("submitted "), "all_final": t.last("progress:"),
         "summary_printed": t.last("results:"), "cpu_total": cpu_total}
    log(f"A: {t.elapsed:.2f} s (phases from its output: cluster spawned {r['cluster_started']}, "
        f"submitted {r['submitted']}, last progress line {r['all_final']}, summary {r['summary_printed']})")
    return r


def wait_ready(url: str, prefixes: list[str], procs: Procs, names: list[str], timeout: float = 180) -> float:
    """Ping until a worker answers for every node-name prefix; returns seconds waited."""
    from celery import Celery

    app = Celery("bench_ping", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=url, result_backend=url)
    t0 = time.monotonic()
    try:
        while True:
            procs.check(names)
            replies = app.control.ping(timeout=1.0) or []
            seen = {name for r in replies for name in r}
            if all(any(s.startswith(p) for s in seen) for p in prefixes):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise BenchmarkError(f"workers {prefixes} not ready after {timeout:.0f} s (answered: "
                                     f"{sorted(seen)})")
    finally:
        app.close()


B_WORKERS = ("b_cpu1", "b_cpu2", "b_control")  # process names (+ tag) of a B cluster


def start_orchestrator_workers(procs: Procs, url: str, root: Path, logs: Path, loglevel: str,
                               tree: Path = REPO, tag: str = "") -> float:
    """B's cluster: 2 CPU workers and a control worker of source tree `tree`; `tag` tells
    apart the process and node names of several clusters (benchmarks/warm_submit.py)."""
    env = cluster_env(url, root)
    if tree != REPO:
        env["PYTHONPATH"] = str(tree)
    base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", loglevel]
    nodes = [f"cpu1{tag}@", f"cpu2{tag}@", f"control{tag}@"]
    workers = {f"b_cpu1{tag}": [*base, "--cpu", "--accept-gpu-runs", "--name", f"{nodes[0]}%h"],
               f"b_cpu2{tag}": [*base, "--cpu", "--accept-gpu-runs", "--name", f"{nodes[1]}%h"],
               f"b_control{tag}": [*base, "--control", "--name", f"{nodes[2]}%h"]}
    for name, argv in workers.items():
        procs.spawn(name, argv, env, logs / f"{name}.log", cwd=tree)
    return wait_ready(url, nodes, procs, list(workers))


def start_noop_workers(procs: Procs, url: str, root: Path, logs: Path, loglevel: str) -> float:
    # Same flags as `orchestrator worker` (orchestrator/cli.py), app benchmarks.noop_tasks.
    def argv(queues: str, name: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "benchmarks.noop_tasks", "worker", "-Q", queues,
                "-c", "1", "-P", "prefork", "-n", name, "-E", "--without-mingle", "--without-gossip",
                "--loglevel", loglevel]

    cpu_env = cluster_env(url, root, ORCH_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    workers = {"c_noop1": (argv("cpu,gpu", "noop1@%h"), cpu_env),
               "c_noop2": (argv("cpu,gpu", "noop2@%h"), cpu_env),
               "c_control": (argv("control", "noopctl@%h"), cluster_env(url, root))}
    for name, (cmd, env) in workers.items():
        procs.spawn(name, cmd, env, logs / f"{name}.log")
    return wait_ready(url, ["noop1@", "noop2@", "noopctl@"], procs, list(workers))


def measure_b(args: argparse.Namespace, tmp: Path, url: str, root: Path, rep: int, points: int,
              runs: int, procs: Procs) -> dict[str, Any]:
    work = tmp / f"b{rep}"
    work.mkdir()
    # The warm workers' results root is fixed when they start; a new experiment name per
    # repetition gives fresh folders under it, so nothing is already DONE.
    exp = f"dispatch_bench_b{rep}"
    write_experiment(work / "exp.yaml", exp, points, args.folds)
    argv = [sys.executable, "-m", "orchestrator", "submit", str(work / "exp.yaml"), "--wait",
            "--broker", url, "--results-root", str(root)]
    names = ["b_cpu1", "b_cpu2", "b_control", "redis"]
    cpu0, sub0, kernel0 = procs.cpu(names), children_cpu(), procs.cpu(names, kernel=True)
    t = Timed(argv, base_env(), work / "submit.out", args.timeout).run()
    cpu = {**cpu_delta(cpu0, procs.cpu(names)), "client": children_cpu() - sub0}
    kernel = cpu_delta(kernel0, procs.cpu(names, kernel=True))
    procs.check(["b_cpu1", "b_cpu2", "b_control"])
    if t.returncode != 0:
        raise BenchmarkError(f"B: orchestrator submit exited {t.returncode}; output ends:\n{t.output()[-3000:]}")
    verify_results(root, exp, runs, points)
    r = {"elapsed": t.elapsed, "cpu": cpu, "kernel": kernel, "submitted": t.first("submitted "),
         "all_final": t.last("progress:"), "summary_printed": t.last("results:"),
         **timeline(root, exp, t.wall_start)}
    # The results stay until the temporary folder goes at the end. Deleting them here
    # made the next repetition slower: an ext4 without a journal (this development VM)
    # skips inodes freed in the last minutes when it allocates new ones, and a run
    # creates about ten (files, folders, status marks, its log).
    return r


def measure_c(runs: int, folds: int, timeout: float, shaped: bool, procs: Procs) -> dict[str, Any]:
    """C: chord(runs no-ops, no-op body). C5 (shaped): runs/folds chords of `folds`."""
    names = ["c_noop1", "c_noop2", "c_control", "redis"]
    cpu0, self0, kernel0 = procs.cpu(names), self_cpu(), procs.cpu(names, kernel=True)
    try:
        r = _measure_c(runs, folds, timeout, shaped)
    finally:
        gc.collect()  # AsyncResult.__del__ unsubscribes from Redis: do it while Redis runs
    r["cpu"] = {**cpu_delta(cpu0, procs.cpu(names)), "client": self_cpu() - self0}
    r["kernel"] = cpu_delta(kernel0, procs.cpu(names, kernel=True))
    procs.check(["c_noop1", "c_noop2", "c_control"])
    return r


def _measure_c(runs: int, folds: int, timeout: float, shaped: bool) -> dict[str, Any]:
    from celery import chord

    from benchmarks.noop_tasks import app, done, noop

    t0 = time.monotonic()
    if not shaped:
        header = [noop.signature(args=(i,), queue=NOOP_QUEUE, priority=NOOP_PRIORITY) for i in range(runs)]
        result = chord(header, app=app)(done.signature(queue="control"))
        got = result.get(timeout=timeout)
        elapsed = time.monotonic() - t0
        if got != runs:
            raise BenchmarkError(f"C: chord body saw {got} results, expected {runs}")
        return {"elapsed": elapsed}
    results = []
    with app.producer_or_acquire() as producer:  # as orchestrator.dispatch.canvas.submit does
        for g in range(0, runs, folds):
            header = [noop.signature(args=(i,), queue=NOOP_QUEUE, priority=NOOP_PRIORITY)
                      for i in range(g, min(g + folds, runs))]
            results.append(chord(header, app=app)(done.signature(queue="control"), producer=producer))
    published = time.monotonic() - t0
    got = [r.get(timeout=timeout) for r in results]
    elapsed = time.monotonic() - t0
    if sum(got) != runs:
        raise BenchmarkError(f"C5: chord bodies saw {sum(got)} results, expected {runs}")
    return {"elapsed": elapsed, "published": published}


def close_celery_client() -> None:
    """Drop this process's result subscriptions while Redis still runs, so that no
    AsyncResult.__del__ tries to unsubscribe from a stopped Redis at interpreter exit."""
    gc.collect()
    noop = sys.modules.get("benchmarks.noop_tasks")
    if noop is None:
        return
    try:
        consumer = noop.app.backend.result_consumer
        if consumer is not None:
            consumer.stop()
            consumer.subscribed_to.clear()
        noop.app.close()
    except Exception as exc:  # noqa: BLE001 - cleanup must go on
        log(f"closing the Celery client: {type(exc).__name__}: {exc}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# -- report -------------------------------------------------------------------------
def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1000, help="runs in all (default 1000)")
    p.add_argument("--folds", type=int, default=5, help="folds per parameter point (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="measure B, C and C5 this many times (default 1)")
    p.add_argument("--skip-a", action="store_true", help="do not measure A (orchestrator run)")
    p.add_argument("--loglevel", default="WARNING", help="Celery log level of the B/C workers")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, results)")
    p.add_argument("--tmp-dir", default=None, metavar="DIR",
                   help="make the temporary folder (results root, Redis, logs) in DIR "
                        "[default: the system's, usually /tmp]")
    args = p.parse_args()
    if args.folds < 2 or args.runs < args.folds or args.repeat < 1:
        p.error("need --folds >= 2, --runs >= --folds and --repeat >= 1")
    points = args.runs // args.folds
    runs = points * args.folds

    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir=args.tmp_dir))
    procs = Procs()
    status = 0
    try:
        ncpu = os.cpu_count()
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else ncpu
        print(f"machine: nproc {affinity} (os.cpu_count {ncpu}), python {sys.version.split()[0]}, "
              f"ORCH_FSYNC={os.environ.get('ORCH_FSYNC', '1 (default)')}, temp dir {tmp}")
        print(f"workload: {runs} runs = {points} groups (chords) x {args.folds} folds, trainer prior, "
              f"dataset iris; 2 training workers + 1 control worker, -c 1 -P prefork")
        compile_tree(REPO)  # as scripts/install.sh does: an edited file's bytecode is stale
        a = None
        if not args.skip_a:
            a = measure_a(args, tmp, points, runs)

        log("starting redis-server and the warm clusters")
        redis_proc, url0 = start_redis(tmp / "redis")
        procs.add("redis", redis_proc, tmp / "redis" / "redis.log")
        url_b = url0  # .../0
        url_c = url0.rsplit("/", 1)[0] + "/1"
        logs = tmp / "logs"
        logs.mkdir()
        b_root = tmp / "b_results"
        ready_b = start_orchestrator_workers(procs, url_b, b_root, logs, args.loglevel)
        ready_c = start_noop_workers(procs, url_c, tmp / "c_results", logs, args.loglevel)
        log(f"ready: orchestrator workers after {ready_b:.1f} s, no-op workers {ready_c:.1f} s more "
            f"(redis {url0.rsplit('/', 1)[0]}, B on db 0, C on db 1)")
        os.environ.update(ORCH_BROKER_URL=url_c, ORCH_RESULT_BACKEND=url_c, ORCH_STATE_URL=url_c)

        bs: list[dict[str, Any]] = []
        cs: list[dict[str, Any]] = []
        c5s: list[dict[str, Any]] = []
        for rep in range(1, args.repeat + 1):
            b = measure_b(args, tmp, url_b, b_root, rep, points, runs, procs)
            bs.append(b)
            log(f"rep {rep}: B {b['elapsed']:.2f} s")
            c = measure_c(runs, args.folds, args.timeout, shaped=False, procs=procs)
            cs.append(c)
            log(f"rep {rep}: C {c['elapsed']:.2f} s")
            c5 = measure_c(runs, args.folds, args.timeout, shaped=True, procs=procs)
            c5s.append(c5)
            log(f"rep {rep}: C5 {c5['elapsed']:.2f} s")

        # -- figures ------------------------------------------------------------------
        print()
        print(f"runs {runs}, folds {args.folds}, groups {points}, repeat {args.repeat}, nproc {affinity}")
        print()
        if a is not None:
            print(f"A  orchestrator run (end to end, cold)      {a['elapsed']:8.2f} s   "
                  f"{runs / a['elapsed']:7.1f} runs/s")
            print(f"     its output: cluster spawned at {fmt_s(a['cluster_started'])}, submitted at "
                  f"{fmt_s(a['submitted'])}, all groups final at {fmt_s(a['all_final'])}, summary at "
                  f"{fmt_s(a['summary_printed'])}, exit at {fmt_s(a['elapsed'])}")
        for rep, (b, c, c5) in enumerate(zip(bs, cs, c5s, strict=True), start=1):
            print(f"rep {rep}: B {b['elapsed']:7.2f} s ({runs / b['elapsed']:6.1f} runs/s)   "
                  f"C {c['elapsed']:7.2f} s ({runs / c['elapsed']:6.1f} runs/s)   "
                  f"C5 {c5['elapsed']:7.2f} s ({runs / c5['elapsed']:6.1f} runs/s)   "
                  f"B/C {b['elapsed'] / c['elapsed']:5.2f}   B/C5 {b['elapsed'] / c5['elapsed']:5.2f}   "
                  f"CPU B {sum(b['cpu'].values()):4.1f} s, C {sum(c['cpu'].values()):4.1f} s, "
                  f"C5 {sum(c5['cpu'].values()):4.1f} s")
        mb = statistics.median(b["elapsed"] for b in bs)
        mc = statistics.median(c["elapsed"] for c in cs)
        mc5 = statistics.median(c["elapsed"] for c in c5s)
        print()
        label = "median " if args.repeat > 1 else ""
        print(f"B  orchestrator submit --wait, warm cluster {mb:8.2f} s   {runs / mb:7.1f} runs/s   ({label}of {len(bs)})")
        print(f"C  raw Celery chord, 1 x {runs} no-ops          {mc:8.2f} s   {runs / mc:7.1f} runs/s")
        print(f"C5 raw Celery, {points} chords x {args.folds} no-ops        {mc5:8.2f} s   {runs / mc5:7.1f} runs/s")
        print()
        verdict = "meets" if mb / mc <= 1.3 else "MISSES"
        print(f"B/C  = {mb / mc:6.2f}   (project goal <= 1.3: {verdict})")
        print(f"B/C5 = {mb / mc5:6.2f}")
        if len(bs) > 1:
            # Each repetition's B and C ran one after the other, so its ratio shares the
            # machine's speed of that moment; the ratio of medians above mixes moments.
            own = statistics.median(b["elapsed"] / c["elapsed"] for b, c in zip(bs, cs, strict=True))
            own5 = statistics.median(b["elapsed"] / c["elapsed"] for b, c in zip(bs, c5s, strict=True))
            print(f"median of each repetition's own B/C {own:.2f}, B/C5 {own5:.2f}")
        if a is not None:
            print(f"A/C  = {a['elapsed'] / mc:6.2f}")
        print()
        print("B breakdown (rep 1, from `submit` output lines and the status files; seconds after start):")
        b = bs[0]
        print(f"  'submitted' printed {fmt_s(b['submitted'])}; first run started {b['first_start']:.2f} s; "
              f"last run finished {b['last_fold_end']:.2f} s; last group finalized {b['last_group_end']:.2f} s; "
              f"last progress line {fmt_s(b['all_final'])}; summary printed {fmt_s(b['summary_printed'])}; "
              f"exit {b['elapsed']:.2f} s")
        print(f"  per run, inside train_run (IN_PROGRESS write -> DONE write): median "
              f"{b['in_task_median'] * 1000:.1f} ms, mean {b['in_task_mean'] * 1000:.1f} ms; gap between "
              f"runs on a worker: median {b['gap_median'] * 1000:.1f} ms, mean {b['gap_mean'] * 1000:.1f} ms")
        print(f"  runs per worker {b['runs_per_worker']}; busy in train_run "
              + ", ".join(f"{w} {s:.1f} s" for w, s in b["busy_per_worker"].items())
              + "; first run per worker "
              + ", ".join(f"{s * 1000:.0f} ms" for s in b["first_run_per_worker"].values()))
        print(f"  finalize lag (group status.json after its last fold): median "
              f"{b['finalize_lag_median'] * 1000:.0f} ms, max {b['finalize_lag_max'] * 1000:.0f} ms")
        print(f"C5: all {points} chords published after {c5s[0]['published']:.2f} s")
        print()
        print(f"CPU seconds used during each measurement (median of {len(bs)} reps; {affinity} cores, so "
              f"wall >= total/{affinity}; in brackets the kernel's part, e.g. creating files):")
        if a is not None:
            print(f"  A  total (orchestrator run + its redis and workers) {a['cpu_total']:6.1f} s "
                  f"= {a['cpu_total'] / runs * 1000:5.1f} ms/run")
        for label, ms, roles in (("B ", bs, (("cpu workers", ("b_cpu1", "b_cpu2")), ("control", ("b_control",)),
                                             ("redis", ("redis",)), ("submit process", ("client",)))),
                                 ("C ", cs, (("noop workers", ("c_noop1", "c_noop2")), ("control", ("c_control",)),
                                             ("redis", ("redis",)), ("client", ("client",)))),
                                 ("C5", c5s, (("noop workers", ("c_noop1", "c_noop2")), ("control", ("c_control",)),
                                              ("redis", ("redis",)), ("client", ("client",))))):
            parts = []
            for role, keys in roles:
                used = statistics.median(sum(m["cpu"][k] for k in keys) for m in ms)
                part = f"{role} {used:.1f}"
                if all(k in ms[0]["kernel"] for k in keys):
                    part += f" ({statistics.median(sum(m['kernel'][k] for k in keys) for m in ms):.1f})"
                parts.append(part)
            total = statistics.median(sum(m["cpu"].values()) for m in ms)
            print(f"  {label} " + ", ".join(parts) + f"; total {total:.1f} s = {total / runs * 1000:.1f} ms/run")
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        status = 130
    except BenchmarkError as exc:
        log(f"FAILED: {exc}")
        status = 1
    except Exception as exc:  # noqa: BLE001 - report, clean up, exit 1
        import traceback

        traceback.print_exc()
        log(f"FAILED: {type(exc).__name__}: {exc}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close_celery_client()
        procs.stop()
        if args.keep:
            log(f"kept {tmp} (logs, results)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
