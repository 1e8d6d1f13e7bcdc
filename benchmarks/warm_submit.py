#!/usr/bin/env python
"""dispatch.py's path B (`orchestrator submit --wait` on a warm cluster), this tree against others, side by side.

    python benchmarks/warm_submit.py [--baseline REF ...] [--tree DIR ...] [--repeat 4]
                                     [--runs 1000] [--folds 5] [--tmp-dir DIR]

One private redis-server. Per source tree (this repository, `git archive` of each
--baseline ref, each --tree folder) a warm cluster of its own, on its own Redis
database: 2 CPU workers and a control worker started from that tree, as dispatch.py
starts them (each tree's bytecode compiled first, as scripts/install.sh compiles it).
Then `repeat` rounds; in each, every tree's `orchestrator submit --wait` of dispatch.py's
experiment (`prior` trainer; a new experiment name per round), the
order reversed every other round. Prints each submit's wall time and the CPU seconds
used meanwhile by each process of its cluster and by the submit, then medians per tree.

Only B: no raw Celery. It answers "is this change faster?" with the machine's drift
shared by both trees, which dispatch.py's B/C cannot (its C moves with the machine).
Exit status: 0 when every submit finished with every run DONE, 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dispatch import (  # noqa: E402
    B_WORKERS,
    BenchmarkError,
    Procs,
    base_env,
    children_cpu,
    start_orchestrator_workers,
    verify_results,
    write_experiment,
)
from benchmarks.trees import compile_tree, export_ref  # noqa: E402
from orchestrator.cluster.local import start_redis  # noqa: E402


def submit(procs: Procs, index: int, tree: Path, url: str, root: Path, work: Path, experiment: str,
           points: int, folds: int) -> dict[str, float]:
    exp = work / f"{experiment}.yaml"
    write_experiment(exp, experiment, points, folds)
    names = [f"{role}t{index}" for role in B_WORKERS] + ["redis"]
    before, sub0 = procs.cpu(names), children_cpu()
    env = base_env()
    env["PYTHONPATH"] = str(tree)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(exp), "--wait", "--broker", url,
                           "--results-root", str(root)], env=env, cwd=tree, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = procs.cpu(names)
    if proc.returncode != 0:
        raise BenchmarkError(f"{tree}: submit exited {proc.returncode}:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    verify_results(root, experiment, points * folds, points)
    cpu = {name.removeprefix("b_").removesuffix(f"t{index}"): after[name] - before[name] for name in names}
    cpu["submit"] = children_cpu() - sub0
    return {"wall": wall, "cpu": sum(cpu.values()), **cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", action="append", default=[], metavar="REF", help="a git ref to compare")
    ap.add_argument("--tree", action="append", default=[], type=Path, metavar="DIR", help="a source tree to compare")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--tmp-dir", default=None, metavar="DIR", help="where the results roots go (e.g. /dev/shm)")
    args = ap.parse_args()
    points = args.runs // args.folds
    print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="warm-submit-", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        # Each tree's bytecode compiled as scripts/install.sh compiles it (trees.py).
        trees = [compile_tree(REPO),
                 *[export_ref(ref, work / f"ref{i}", compiled=True) for i, ref in enumerate(args.baseline)],
                 *[compile_tree(t.resolve()) for t in args.tree]]
        labels = ["this tree", *args.baseline, *map(str, args.tree)]
        if len(trees) > 15:
            raise SystemExit("at most 15 trees (one Redis database each)")
        try:
            redis_proc, url0 = start_redis(work / "redis")
            procs.add("redis", redis_proc, work / "redis" / "redis.log")
            (work / "logs").mkdir()
            urls = [url0.rsplit("/", 1)[0] + f"/{i}" for i in range(len(trees))]
            for i, tree in enumerate(trees):
                start_orchestrator_workers(procs, urls[i], work / f"results{i}", work / "logs", "WARNING",
                                           tree=tree, tag=f"t{i}")
            results: list[list[dict[str, float]]] = [[] for _ in trees]
            for rep in range(args.repeat):
                order = list(range(len(trees)))[:: 1 if rep % 2 == 0 else -1]
                for i in order:
                    r = submit(procs, i, trees[i], urls[i], work / f"results{i}", work, f"warm{rep}", points,
                               args.folds)
                    results[i].append(r)
                    parts = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k not in ("wall", "cpu"))
                    print(f"rep {rep} {labels[i]}: {r['wall']:.2f} s, CPU {r['cpu']:.2f} s ({parts})", flush=True)
            print()
            for label, rs in zip(labels, results, strict=True):
                wall = statistics.median(r["wall"] for r in rs)
                cpu = statistics.median(r["cpu"] for r in rs)
                print(f"{label}: median of {len(rs)}: wall {wall:.2f} s, CPU {cpu:.2f} s "
                      f"({cpu / args.runs * 1000:.1f} ms/run)")
        except BenchmarkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
