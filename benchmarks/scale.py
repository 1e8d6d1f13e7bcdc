#!/usr/bin/env python
"""How plan, submit, status and watch scale with the size of one experiment.

    python benchmarks/scale.py [--sizes 1000,10000,100000] [--folds 5] [--repeat 1]
                               [--tmp-dir DIR] [--keep]

One private redis-server (free port, its own folder) and no workers at all: nothing is
trained, every submitted run stays queued. Per size, on a flushed Redis and a fresh
results root, the experiment of benchmarks/dispatch.py (`prior` trainer, one grid axis
of size/folds points x `folds` folds, seed 0) is put through, each command a process of
its own as an operator runs it:

  plan      `orchestrator plan exp.yaml` (the table of every run)
  submit    `orchestrator submit exp.yaml --broker URL` (no --wait)
  status    `orchestrator status EXP` (ORCH_BROKER_URL set: it also asks Redis)
  json      `orchestrator status EXP --json`
  watch     `orchestrator watch EXP --once --broker URL`
  frame     the first watch frame, in-process: views.dashboard Collector.collect() (its
            manifest read included) + frame_text(), without the interpreter's start
  next      the next frame of the same collector: what `watch` redraws every --interval

and Redis's memory before and after the submit (INFO used_memory), divided by the runs,
with what each kind of key holds (MEMORY USAGE). Every command is checked (exit 0, the
right number of runs queued and shown). The figures: wall and CPU seconds, CPU time per
run, and the growth exponent between consecutive sizes, log(t2/t1) / log(n2/n1), of CPU
and of wall time: 1 is linear, below 1 the fixed cost of starting a process still shows,
above 1 grows worse than linearly. The verdict uses CPU time (the wall time of a shared
machine measures the others' load too) and allows 1.15 for noise. With --repeat N the
commands are timed N times (the submit each time on a flushed Redis and an empty results
root; the frames at least 5 times); medians.
Everything started here is stopped at the end, also on errors and Ctrl-C, and the
temporary folder is removed (unless --keep).
Exit status: 0 when everything ran, checked out and grew at most linearly; 1 when
something broke or a stage grew worse than linearly; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dispatch import (  # noqa: E402
    NOOP_QUEUE,
    BenchmarkError,
    _raise_interrupt,
    children_cpu,
    cluster_env,
    log,
    tail,
    write_experiment,
)
from benchmarks.submit_cpu import QUEUE_KEY  # noqa: E402  (kombu's key of the runs' queue)
from benchmarks.trees import compile_tree  # noqa: E402
from orchestrator.cluster.local import start_redis, stop_process  # noqa: E402

STAGES = ("plan", "submit", "status", "json", "watch", "frame", "next")
LABELS = {"plan": "plan", "submit": "submit", "status": "status", "json": "status --json",
          "watch": "watch --once", "frame": "watch frame 1", "next": "watch frame 2+"}
WORSE_THAN_LINEAR = 1.15  # growth exponent (of CPU time) above which a stage is superlinear

FRAME_CODE = """
import statistics, sys, time
from orchestrator.views import dashboard
from orchestrator.paths import Layout

url, root, experiment, n = sys.argv[1:5]
client = dashboard.redis_client(url)
times = {"frame": [], "next": []}
for _ in range(int(n)):
    # A new collector each time: the first frame of a watch (its manifest read), then
    # the next one (the manifest cached), which a watch redraws every --interval.
    collector = dashboard.Collector(Layout(root), client, url, experiment)
    for kind in ("frame", "next"):
        w, c = time.perf_counter(), time.process_time()
        snap = collector.collect()
        text = dashboard.frame_text(snap, 100)
        times[kind].append((time.perf_counter() - w, time.process_time() - c))
        if snap.error:
            sys.exit(snap.error)
for kind in ("frame", "next"):
    print(statistics.median(t[0] for t in times[kind]), statistics.median(t[1] for t in times[kind]))
print(text)
"""


def timed(argv: list[str], env: dict[str, str], logfile: Path, timeout: float) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one command; its output goes to `logfile`."""
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{' '.join(argv[2:5])} ... ran past {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    cpu = children_cpu() - cpu0
    stdout = proc.stdout.decode(errors="replace")
    logfile.write_text(stdout + proc.stderr.decode(errors="replace"))
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv[2:4])} exited {proc.returncode}; output ends:\n{tail(logfile)}")
    return wall, cpu, stdout


def redis_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def key_kind(key: bytes) -> str:
    """What a key of a submission is, for the memory breakdown."""
    name = key.decode(errors="replace")
    if name == QUEUE_KEY:
        return f"queue {NOOP_QUEUE} (the run messages)"
    if name.startswith("celery-taskset-meta-"):
        return "chord counters (one per group)"
    if name.startswith("_kombu.binding"):
        return "kombu bindings"
    if name.startswith("orch:"):
        return "orch:* (live state)"
    return "other: " + name[:40]


def memory_by_kind(client: Any) -> dict[str, tuple[int, int]]:
    """kind -> (keys, bytes by MEMORY USAGE with every element sampled)."""
    found: dict[str, list[int]] = {}
    for key in client.scan_iter(count=1000):
        used = client.memory_usage(key, samples=0) or 0
        entry = found.setdefault(key_kind(key), [0, 0])
        entry[0] += 1
        entry[1] += used
    return {k: (v[0], v[1]) for k, v in sorted(found.items(), key=lambda kv: -kv[1][1])}


def median_of(results: list[tuple[float, float, str]]) -> dict[str, float]:
    return {"wall": statistics.median(r[0] for r in results), "cpu": statistics.median(r[1] for r in results)}


def measure(size: int, args: argparse.Namespace, tmp: Path, url: str, client: Any) -> dict[str, Any]:
    work = tmp / f"n{size}"
    work.mkdir()
    exp, groups = f"scale_{size}", size // args.folds
    write_experiment(work / "exp.yaml", exp, groups, args.folds)
    root = work / "results"
    env = cluster_env(url, root)
    orch = [sys.executable, "-m", "orchestrator"]
    figures: dict[str, Any] = {"runs": size, "groups": groups}

    def repeated(name: str, argv: list[str]) -> str:
        got = [timed(argv, env, work / f"{name}.{i}.out", args.timeout) for i in range(args.repeat)]
        figures[name] = median_of(got)
        log(f"{size}: {LABELS[name]} {figures[name]['wall']:.2f} s")
        return got[-1][2]

    client.flushdb()
    text = repeated("plan", [*orch, "plan", str(work / "exp.yaml"), "--results-root", str(root)])
    if f"{size} runs in {groups} groups: 0 DONE, {size} to run" not in text:
        raise BenchmarkError(f"plan of {size} runs printed no total line for them; it ends:\n{text[-500:]}")

    submits = []
    for i in range(args.repeat):  # each on a flushed Redis and an empty results root
        client.flushdb()
        shutil.rmtree(root, ignore_errors=True)
        before = redis_memory(client)
        submits.append(timed([*orch, "submit", str(work / "exp.yaml"), "--broker", url, "--results-root",
                              str(root)], env, work / f"submit.{i}.out", args.timeout))
        figures["memory"] = redis_memory(client) - before
        queued = client.llen(QUEUE_KEY)
        if queued != size:
            raise BenchmarkError(f"after the submit of {size} runs, {queued} messages wait in {QUEUE_KEY!r}")
    figures["submit"] = median_of(submits)
    log(f"{size}: submit {figures['submit']['wall']:.2f} s")
    figures["by_kind"] = memory_by_kind(client)

    text = repeated("status", [*orch, "status", exp, "--results-root", str(root)])
    if f"{exp}: groups" not in text or f"runs {{'NEW': {size}}}" not in text:
        raise BenchmarkError(f"status of {size} queued runs printed:\n{text[:500]}")
    data = json.loads(repeated("json", [*orch, "status", exp, "--json", "--results-root", str(root)]))
    shown = sum(len(g["folds"]) for g in data["group_details"])
    if sum(data["runs"].values()) != size or shown != size or len(data["group_details"]) != groups:
        raise BenchmarkError(f"status --json of {size} runs counts {data['runs']}, shows {shown} folds "
                             f"in {len(data['group_details'])} groups")
    text = repeated("watch", [*orch, "watch", exp, "--once", "--broker", url, "--results-root", str(root)])
    if f"0/{size}" not in text:
        raise BenchmarkError(f"watch --once of {size} queued runs printed:\n{text[:800]}")

    # In-process, `repeat` times (at least 5: they are short): a first frame (a fresh
    # collector), then the next one.
    _, _, text = timed([sys.executable, "-c", FRAME_CODE, url, str(root), exp, str(max(5, args.repeat))],
                       env, work / "frame.out", args.timeout)
    first, second, frame = text.split("\n", 2)
    for kind, line in (("frame", first), ("next", second)):
        wall, cpu = map(float, line.split())
        figures[kind] = {"wall": wall, "cpu": cpu}
        log(f"{size}: {LABELS[kind]} {wall:.3f} s")
    if f"0/{size}" not in frame:
        raise BenchmarkError(f"the in-process watch frame of {size} runs shows:\n{frame[:800]}")

    client.flushdb()
    shutil.rmtree(root, ignore_errors=True)  # 100,000 runs: ~25 MB of manifest, the rest empty
    return figures


def exponent(t1: float, t2: float, n1: int, n2: int) -> float:
    return math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 else float("nan")


def report(results: list[dict[str, Any]]) -> bool:
    """Print the tables; True when no stage's CPU time grew worse than linearly."""
    ok = True
    print()
    print(f"{'stage':<15} {'runs':>7} {'wall s':>9} {'CPU s':>8} {'CPU ms/run':>11} {'per-run ratio':>14} "
          f"{'exp. CPU':>9} {'exp. wall':>10}")
    for stage in STAGES:
        prev: dict[str, Any] | None = None
        for r in results:
            wall, cpu, n = r[stage]["wall"], r[stage]["cpu"], r["runs"]
            ratio = e_cpu = e_wall = ""
            if prev is not None:
                ratio = f"{(cpu / n) / (prev[stage]['cpu'] / prev['runs']):.2f}"
                e = exponent(prev[stage]["cpu"], cpu, prev["runs"], n)
                e_cpu = f"{e:.2f}" + (" !" if e > WORSE_THAN_LINEAR else "")
                ok = ok and not e > WORSE_THAN_LINEAR
                e_wall = f"{exponent(prev[stage]['wall'], wall, prev['runs'], n):.2f}"
            print(f"{LABELS[stage]:<15} {n:>7} {wall:>9.3f} {cpu:>8.3f} {cpu / n * 1000:>11.4f} {ratio:>14} "
                  f"{e_cpu:>9} {e_wall:>10}")
            prev = r
        print()
    print("per-run ratio: CPU ms/run at this size over CPU ms/run at the size before (1.0: linear);")
    print("exp.: growth exponent log(t2/t1)/log(n2/n1) of CPU and wall time (1.0: linear; below 1:")
    print(f"the fixed cost of a process start still shows; '!' marks a CPU exponent above {WORSE_THAN_LINEAR}).")
    print("The verdict uses CPU time: on a shared machine the wall time also measures the others' load.")
    print()
    print(f"{'Redis memory':<15} {'runs':>7} {'used_memory +':>14} {'bytes/run':>10}")
    for r in results:
        print(f"{'after submit':<15} {r['runs']:>7} {r['memory'] / 2**20:>11.1f} MB {r['memory'] / r['runs']:>10.0f}")
    big = results[-1]
    print()
    print(f"keys after the submit of {big['runs']} runs (MEMORY USAGE, every element sampled):")
    for kind, (count, used) in big["by_kind"].items():
        print(f"  {kind:<38} {count:>7} keys {used / 2**20:>9.1f} MB {used / big['runs']:>8.0f} B/run")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="runs per experiment, comma-separated, "
                   "ascending (default 1000,10000,100000)")
    p.add_argument("--folds", type=int, default=5, help="folds per parameter point (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="time the read-only commands this many times")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one command may take")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs, redis log)")
    p.add_argument("--tmp-dir", default=None, metavar="DIR",
                   help="make the temporary folder (results roots, Redis) in DIR [default: the system's]")
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be whole numbers separated by commas, got {args.sizes!r}")
    if args.folds < 2 or args.repeat < 1 or any(s < args.folds or s % args.folds for s in sizes) \
            or sizes != sorted(set(sizes)):
        p.error("need --folds >= 2, --repeat >= 1, and ascending --sizes, each a multiple of --folds")

    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.tmp_dir))
    redis_proc = None
    status = 0
    try:
        import redis

        compile_tree(REPO)  # as scripts/install.sh does: every command starts as installed
        redis_proc, url = start_redis(tmp / "redis")
        client = redis.Redis.from_url(url)
        version = client.info("server")["redis_version"]
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print("command:", " ".join([sys.executable, *sys.argv]))
        print(f"machine: nproc {affinity}, python {sys.version.split()[0]}, redis-server {version}, "
              f"temp dir {tmp}; no workers: every submitted run stays queued")
        print(f"workload: sizes {sizes}, {args.folds} folds a group, trainer prior, dataset iris, "
              f"repeat {args.repeat}", flush=True)
        results = [measure(size, args, tmp, url, client) for size in sizes]
        if not report(results):
            log("a stage grew worse than linearly (exponent marked '!')")
            status = 1
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        status = 130
    except BenchmarkError as exc:
        log(f"FAILED: {exc}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if redis_proc is not None:
            stop_process(redis_proc, signal.SIGTERM, 5.0)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
