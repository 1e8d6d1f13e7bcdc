#!/usr/bin/env python
"""Cost of `orchestrator submit` (no --wait) and of one progress poll, without workers.

    python benchmarks/submit_cpu.py [--runs 1000] [--folds 5] [--repeat 5] [--tree DIR ...]

A private redis-server (no workers). Per repeat and per source tree (default: this
repository; several --tree options compare trees side by side, alternately), on a
flushed Redis and a fresh results root: the wall time and CPU (user + system) of
`python -m orchestrator submit exp.yaml` for the experiment of benchmarks/dispatch.py
(`prior` trainer), and the time from the process's start to the first message in the
`gpu` queue (polled every millisecond from here). Then the CPU of one progress poll
(`orchestrator.views.progress.counts`, and `Poller.poll` where it exists)
over the live state the submissions left (every run PENDING), in a process of the same
tree. Medians are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dispatch import NOOP_PRIORITY, NOOP_QUEUE, children_cpu, write_experiment  # noqa: E402
from orchestrator.cluster.local import start_redis, stop_process  # noqa: E402

QUEUE_KEY = f"{NOOP_QUEUE}:{NOOP_PRIORITY}"  # kombu's key for that priority (sep ":")


def submit_once(tree: Path, url: str, exp: Path, root: Path) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    first: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        probe = redis.Redis.from_url(url)
        while not stop.is_set():
            if probe.llen(QUEUE_KEY):
                first.append(time.perf_counter())
                return
            time.sleep(0.001)

    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = str(tree)
    argv = [sys.executable, "-m", "orchestrator", "submit", str(exp), "--broker", url,
            "--results-root", str(root)]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"submit failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"wall": elapsed, "cpu": cpu, "first": (first[0] - t0) if first else float("nan")}


POLL_CODE = """
import statistics, sys, time
from orchestrator.views import progress
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand
from orchestrator.livestate import LiveState
from orchestrator.paths import Layout
from orchestrator.experiment.plan import make_plan

url, exp, root, experiment, n = sys.argv[1:6]
plans = make_plan(Layout(root), expand(load_experiments([exp])[0]))
live = LiveState.from_url(url)
tracked = [progress.Tracked(experiment, plans)]

def cpu(fn):
    fn()
    times = []
    for _ in range(int(n)):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return statistics.median(times)

full = cpu(lambda: progress.counts(live, tracked))
poller = getattr(progress, "Poller", None)
steady = cpu(poller(live, tracked).poll) if poller else full
print(f"{full * 1000:.2f} {steady * 1000:.2f}")
"""


def poll_cpu(tree: Path, url: str, exp: Path, root: Path, experiment: str, n: int = 30) -> tuple[float, float]:
    """CPU milliseconds of one progress poll of `tree` (median of n), in a process of
    its own: (a poll that reads every run's state, a poll as `wait` does it every 0.2 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = str(tree)
    out = subprocess.run([sys.executable, "-c", POLL_CODE, url, str(exp), str(root), experiment, str(n)],
                         env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tree", action="append", type=Path, help="source tree(s) to time (default: this one)")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [REPO])]
    print("command:", " ".join([sys.executable, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="submit-cpu-") as tmp:
        work = Path(tmp)
        proc, url = start_redis(work / "redis")
        try:
            exp = work / "exp.yaml"
            write_experiment(exp, "bench", args.runs // args.folds, args.folds)
            results: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
            for rep in range(args.repeat):
                for tree in trees:
                    r = submit_once(tree, url, exp, work / f"results-{rep}-{trees.index(tree)}")
                    results[tree].append(r)
                    print(f"rep {rep} {tree}: wall {r['wall']:.3f} s, cpu {r['cpu']:.3f} s, "
                          f"first message {r['first']:.3f} s", flush=True)
            for tree in trees:
                rs = results[tree]
                med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "first")}
                print(f"{tree}: median of {len(rs)}: wall {med['wall']:.3f} s, cpu {med['cpu']:.3f} s, "
                      f"first message {med['first']:.3f} s")
            # the last submission's live state: every run PENDING
            for tree in trees:
                full, steady = poll_cpu(tree, url, exp, work / "empty", "bench")
                print(f"{tree}: one progress poll: {full:.2f} ms CPU reading every run, "
                      f"{steady:.2f} ms CPU as `wait` polls (medians of 30)")
        finally:
            stop_process(proc)


if __name__ == "__main__":
    main()
