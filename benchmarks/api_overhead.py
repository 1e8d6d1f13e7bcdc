#!/usr/bin/env python
"""The per-evaluation overhead of the Python API's `evaluate`, against `submit` of the same
runs as one experiment, side by side on one private cluster.

    python benchmarks/api_overhead.py [--runs 1000] [--workers 2] [--tmp-dir DIR]

One `orch.local(workers=N)` cluster (redis-server, N CPU workers, a control worker),
warmed by one evaluation. Then, each on runs of its own (distinct `smoothing` values of
the near-free `prior` trainer on iris, one train/validation split, so one run per group):

S  `client.submit(config)`: one experiment whose sweep has `runs` points; then `wait()`.
E  `client.evaluate(...)` once per point, one call after the other, as an outside
   optimiser would ask them; then every future through `as_completed`.
M  `client.map(...)`: every point in one call; then `as_completed`.

For each: the caller's wall time and CPU to hand the runs over (the submit call, the
`runs` evaluate calls, the map call), per run, and the wall time until the last run is
DONE. The workers' own cost per run is the same in the three (one run, one finalize);
the difference is the API's overhead per evaluation. Exit 0 when every run of the three
ended DONE, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import orchestrator as orch  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def phase_submit(client: orch.Client, values: list[float]) -> dict[str, Any]:
    config = {"experiment": "bench_submit", "trainer": "prior", "datasets": ["iris"],
              "split": {"validation": 0.2}, "resources": {"gpus": 0},
              "sweep": {"grid": {"smoothing": values}}}
    start, c0 = time.monotonic(), cpu()
    exp = client.submit(config)
    handed, c1 = time.monotonic(), cpu()
    status = exp.wait(progress=False)
    end = time.monotonic()
    return {"hand_over_s": handed - start, "hand_over_cpu_s": c1 - c0, "total_s": end - start,
            "done": status["runs"].get("DONE", 0)}


def phase_evaluate(client: orch.Client, values: list[float], one_by_one: bool) -> dict[str, Any]:
    experiment = "bench_evaluate" if one_by_one else "bench_map"
    start, c0 = time.monotonic(), cpu()
    if one_by_one:
        futures = [client.evaluate("prior", {"smoothing": v}, "iris", experiment=experiment,
                                   resources={"gpus": 0}) for v in values]
    else:
        futures = client.map("prior", [{"smoothing": v} for v in values], "iris", experiment=experiment,
                             resources={"gpus": 0})
    handed, c1 = time.monotonic(), cpu()
    done = sum(f.state() == "DONE" for f in orch.as_completed(futures))
    end = time.monotonic()
    return {"hand_over_s": handed - start, "hand_over_cpu_s": c1 - c0, "total_s": end - start,
            "done": done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tmp-dir", default=None, help="where the results root goes (default: the system's)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="api-overhead-", dir=args.tmp_dir))
    n = args.runs
    # Distinct values for each phase: the same run in two experiments would train twice
    # anyway (its own folder), but distinct points keep the three phases independent.
    values = {k: [round(0.001 + (i + 1) * 1e-4 + o, 6) for i in range(n)]
              for k, o in (("S", 0.0), ("E", 10.0), ("M", 20.0))}
    results: dict[str, dict[str, Any]] = {}
    try:
        with orch.local(workers=args.workers, results_root=tmp / "results") as client:
            log(f"cluster up at {client.broker}; warming up")
            client.evaluate("prior", {"smoothing": 99.0}, "iris", experiment="warmup",
                            resources={"gpus": 0}).result(timeout=300)
            for key, name in (("S", "submit"), ("E", "evaluate"), ("M", "map")):
                log(f"{name}: {n} runs")
                results[key] = (phase_submit(client, values[key]) if key == "S"
                                else phase_evaluate(client, values[key], one_by_one=key == "E"))
                log(f"{name}: {results[key]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n} runs of `prior` (one split each), {args.workers} CPU workers, load {os.getloadavg()[0]:.1f}")
    print(f"{'':10} {'hand-over':>10} {'per run':>9} {'CPU':>8} {'CPU/run':>9} {'until DONE':>11} {'DONE':>6}")
    for key, name in (("S", "submit"), ("E", "evaluate"), ("M", "map")):
        r = results[key]
        print(f"{name:10} {r['hand_over_s']:9.2f}s {1000 * r['hand_over_s'] / n:7.2f}ms "
              f"{r['hand_over_cpu_s']:7.2f}s {1000 * r['hand_over_cpu_s'] / n:7.2f}ms "
              f"{r['total_s']:10.1f}s {r['done']:6d}")
    extra = (results["E"]["hand_over_cpu_s"] - results["S"]["hand_over_cpu_s"]) / n
    print(f"evaluate's own CPU per evaluation beyond submit's per run: {1000 * extra:.2f} ms")
    return 0 if all(r["done"] == n for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
