#!/usr/bin/env python
"""How fast `orchestrator run` (local mode) starts and stops, for two trees side by side.

    python benchmarks/localrun.py [--before REF] [--after REF] [--repeat 5] [--cases sweep,iris,up,upgpu]

Each tree is a `git archive` of its ref, compiled as scripts/install.sh compiles it.
Per repeat, alternating the trees, `orchestrator run --workers 2` of
  sweep  100 runs of 50 ms (the test trainer `slow`: 20 grid points x 5 folds)
  iris   configs/iris_kfold.yaml (10 runs of the `mlp` trainer)
with a fresh results root, timed from the command: the first run started (the earliest
`started_at` in the status files), the last run done (the latest `finished_at`), the
process's exit, and "last done -> exit"; and
  up     `orchestrator workers up --cpu 2` on a fresh Redis: from the command until both
         workers consume (two clients of that Redis blocked in BRPOP on their queues),
         and until the command returns (it waits for both to register)
  upgpu  (only with --cases upgpu) the same with `--gpus 0,1` on two GPUs faked at the NVML
         seam (tests/fake_nvml.py): two GPU workers (torch imported, CUDA never touched)
  worker (only with --cases worker) one `orchestrator worker --cpu` as the test suite's
         clusters start theirs: from the command until its log says it is ready
Prints the medians per tree and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.trees import export_ref  # noqa: E402

SWEEP = f"""experiment: sweep100
trainer: slow
datasets: [iris]
folds: 5
params: {{short_fold: -1}}
sweep:
  grid:
    seconds: [{", ".join(f"{0.05 + i * 1e-4:.4f}" for i in range(20))}]
resources: {{gpus: 0}}
"""


def one(tree: Path, config: Path, work: Path) -> dict[str, float]:
    root = work / "results"
    shutil.rmtree(root, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=str(tree), ORCH_TRAINER_MODULES="tests.plugins", PYTHONDONTWRITEBYTECODE="1")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(config), "--workers", "2",
                           "--results-root", str(root)], cwd=tree, env=env, capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    records = [json.loads(p.read_text()) for p in root.glob("**/status/fold_*.json")]
    started = min(r["started_at"] for r in records)
    finished = max(r["finished_at"] for r in records)
    return {"first run started": started - start, "last run done": finished - start,
            "exit": end - start, "last done -> exit": end - finished, "runs": len(records)}


FAKE_GPUS = {"driver": "550.54.15", "gpus": [
    {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559, "memory_used_mb": 0, "utilization": 0, "uuid": "GPU-a"},
    {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559, "memory_used_mb": 0, "utilization": 0, "uuid": "GPU-b"}]}


def up(tree: Path, work: Path, gpus: bool = False) -> dict[str, float]:
    """`workers up --cpu 2` (`gpus`: `--gpus 0,1` on two fake GPUs) against a fresh Redis,
    then `workers down`."""
    import redis

    sys.path.insert(0, str(REPO))
    from orchestrator.cluster.local import start_redis, stop_process

    folder = work / "up"
    shutil.rmtree(folder, ignore_errors=True)
    redis_proc, url = start_redis(folder / "redis")
    client = redis.Redis.from_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=str(tree), ORCH_TRAINER_MODULES="tests.plugins", PYTHONDONTWRITEBYTECODE="1")
    which = ["--cpu", "2"]
    if gpus:
        (folder / "nvml.json").write_text(json.dumps(FAKE_GPUS))
        env.update(ORCH_NVML_MODULE="tests.fake_nvml", ORCH_FAKE_NVML=str(folder / "nvml.json"))
        which = ["--gpus", "0,1"]
    state = ["--state-dir", str(folder / "state")]
    try:
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "workers", "up", *which, "--broker", url,
                                 "--results-root", str(folder / "results"), *state], cwd=tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        consuming = returned = None
        while consuming is None or returned is None:
            if returned is None and proc.poll() is not None:
                returned = time.time()
            if consuming is None and sum(c.get("cmd") == "brpop" for c in cast("list[dict[str, str]]", client.client_list())) >= 2:
                consuming = time.time()
            if time.time() - start > 120:
                raise SystemExit(f"workers up did not start two consuming workers: {proc.stderr}")
            time.sleep(0.02)
        if proc.returncode != 0:
            raise SystemExit(f"workers up failed ({proc.returncode})")
        return {"all consuming": consuming - start, "command returned": returned - start}
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "workers", "down", *state], cwd=tree, env=env,
                       capture_output=True, timeout=120)
        stop_process(redis_proc)


def worker(tree: Path, work: Path) -> dict[str, float]:
    """One `orchestrator worker --cpu` against a fresh Redis, until it logs that it is ready."""
    sys.path.insert(0, str(REPO))
    from orchestrator.cluster.local import spawn, start_redis, stop_process

    folder = work / "worker"
    shutil.rmtree(folder, ignore_errors=True)
    redis_proc, url = start_redis(folder / "redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=str(tree), ORCH_TRAINER_MODULES="tests.plugins", PYTHONDONTWRITEBYTECODE="1",
               ORCH_BROKER_URL=url, ORCH_RESULTS_ROOT=str(folder / "results"))
    log = folder / "worker.log"
    try:
        start = time.time()
        proc = spawn([sys.executable, "-m", "orchestrator", "worker", "--cpu", "--loglevel", "INFO"], env, log)
        while "ready." not in (log.read_text(errors="replace") if log.exists() else ""):
            if proc.poll() is not None or time.time() - start > 120:
                raise SystemExit(f"the worker did not start: {log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.02)
        ready = time.time() - start
        stop_process(proc)
        return {"ready": ready}
    finally:
        stop_process(redis_proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="HEAD~1")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", default="sweep,iris,up", help="of sweep, iris, up, upgpu, worker")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="localrun-"))
    try:
        trees = {ref: export_ref(ref, work / f"tree{i}", compiled=True)
                 for i, ref in enumerate((args.before, args.after))}
        sweep = work / "sweep100.yaml"
        sweep.write_text(SWEEP)
        cases: dict[str, Path | None] = {c: sweep if c == "sweep" else None for c in args.cases.split(",")}
        found: dict[tuple[str, str], list[dict[str, float]]] = {}
        print(f"load average at the start: {os.getloadavg()}")
        for i in range(args.repeat):
            for case, config in cases.items():
                for ref, tree in trees.items():
                    cfg = config or tree / "configs" / "iris_kfold.yaml"
                    measure = {"up": up, "upgpu": lambda t, w: up(t, w, gpus=True), "worker": worker}.get(case)
                    figures = measure(tree, work) if measure else one(tree, cfg, work)
                    found.setdefault((case, ref), []).append(figures)
                    print(f"[{i + 1}/{args.repeat}] {case:5} {ref:10} " +
                          ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if k != "runs"), flush=True)
        print(f"\nmedians of {args.repeat} (seconds from the command); load average at the end: {os.getloadavg()}")
        for case in cases:
            keys = [k for k in found[case, args.before][0] if k != "runs"]
            print(f"{case:6} {'tree':12} " + " ".join(f"{k:>18}" for k in keys))
            for ref in trees:
                runs = found[case, ref]
                print(f"{'':6} {ref:12} " + " ".join(f"{statistics.median(r[k] for r in runs):18.2f}" for k in keys))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
