#!/usr/bin/env python
"""CPU a training worker's process spends per run in `tasks.train_run`, this tree versus another.

    python benchmarks/run_cpu.py [--runs 300] [--repeat 3] [--baseline main] [--tmp-dir DIR]

Runs `runs` fresh runs of the `prior` trainer on iris (5 folds per point) through the
`tasks.train_run` task body (Celery's eager `apply`: the task's own work, its lease
round trips to a private redis-server and its files under a temporary results root;
not the broker messages or the result backend, which raw Celery pays alike), in a child
process per tree (PYTHONPATH = that tree; the baseline is `git archive` of --baseline),
`repeat` passes each, the trees alternating. Prints CPU ms per run (getrusage, user+sys
and the kernel's part), the medians, and checks that every run ended DONE with its four
files. --tmp-dir puts the results root on another filesystem (e.g. /dev/shm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(work: Path, runs: int, tag: str) -> None:
    """In the tree under test (PYTHONPATH): one pass of `runs` fresh runs."""
    from orchestrator.collect.status import fold_state
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand
    from orchestrator.paths import FOLD_FILES, Layout
    from tasks.training import train_run

    points = max(1, runs // 5)
    values = [round(0.001 * (i + 1), 6) for i in range(points)]
    cfg = work / f"{tag}.yaml"
    cfg.write_text(f"experiment: {tag}\ntrainer: prior\ndatasets: [iris]\nfolds: 5\nholdout: 0.2\n"
                   f"seeds: [0]\nsweep:\n  grid:\n    smoothing: {json.dumps(values)}\n")
    specs = [s.to_dict() for s in expand(load_experiments([str(cfg)])[0])]
    train_run.apply(args=(specs[0], None))  # warm: imports, dataset cache, script loads
    specs = specs[1:]
    before = resource.getrusage(resource.RUSAGE_SELF)
    for spec in specs:
        result = train_run.apply(args=(spec, None))
        if result.failed():
            raise SystemExit(f"{spec['fold']}: {result.result!r}")
    after = resource.getrusage(resource.RUSAGE_SELF)
    layout = Layout(Path(os.environ["ORCH_RESULTS_ROOT"]))
    from orchestrator.experiment.spec import RunSpec
    for spec in map(RunSpec.from_dict, specs):
        state, _ = fold_state(layout, spec)
        files = layout.fold_files(spec)
        if state != "DONE" or not all(files[f].is_file() for f in FOLD_FILES):
            raise SystemExit(f"{spec.name}: {state}, files {[f for f in FOLD_FILES if not files[f].is_file()]}")
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps([(user + system) * 1000 / len(specs), system * 1000 / len(specs)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default="main", help="git ref to compare with")
    parser.add_argument("--tmp-dir", default=None)
    parser.add_argument("--child", nargs=3, metavar=("WORK", "RUNS", "TAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), int(args.child[1]), args.child[2])
        return 0

    sys.path.insert(0, str(REPO))
    from benchmarks.trees import export_ref
    from orchestrator.cluster.local import start_redis, stop_process

    print("$", " ".join([os.path.basename(sys.executable), *sys.argv]))
    work = Path(tempfile.mkdtemp(prefix="run-cpu-", dir=args.tmp_dir))
    redis_proc = None
    try:
        base = export_ref(args.baseline, work / "baseline")
        redis_proc, url = start_redis(work / "redis")
        trees = {f"baseline ({args.baseline})": base, "this tree": REPO}
        times: dict[str, list[list[float]]] = {label: [] for label in trees}
        for rep in range(args.repeat):  # alternate the trees: drifting machine load hits both
            for db, (label, tree) in enumerate(trees.items(), start=1):
                db_url = url.rsplit("/", 1)[0] + f"/{db}"
                env = {**os.environ, "PYTHONPATH": str(tree), "ORCH_RESULTS_ROOT": str(work / f"root{db}"),
                       "ORCH_BROKER_URL": db_url, "ORCH_RESULT_BACKEND": db_url, "ORCH_STATE_URL": db_url,
                       "ORCH_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
                proc = subprocess.run([sys.executable, __file__, "--child", str(work), str(args.runs),
                                       f"cpu{db}r{rep}"], env=env, capture_output=True, text=True, cwd=tree)
                if proc.returncode:
                    print(proc.stdout, proc.stderr, file=sys.stderr)
                    return 1
                times[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{args.runs} runs per pass (prior on iris), {args.repeat} passes per tree, results root in "
              f"{work}: CPU ms per run of the train_run task body (getrusage user+sys, and sys):")
        medians = []
        for label, t in times.items():
            total, system = (statistics.median(x[i] for x in t) for i in (0, 1))
            medians.append(total)
            print(f"  {label:<22} median {total:6.3f} (sys {system:5.3f})   passes "
                  f"{' '.join(f'{x[0]:.3f}' for x in t)}")
        print(f"  this/baseline: {medians[1] / medians[0]:.2f}")
        return 0
    finally:
        if redis_proc is not None:
            stop_process(redis_proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
