#!/usr/bin/env python
"""CPU the control worker spends per group in `tasks.finalize`, this tree versus another.

    python benchmarks/finalize_cpu.py [--groups 200] [--folds 5] [--repeat 5] [--baseline main]

Trains `groups` x `folds` runs of the `prior` trainer on iris with the worker's code
(orchestrator.execution.runner.execute) into a temporary results root, copies it once per tree,
and in a child process per tree (PYTHONPATH = that tree; the baseline is `git archive`
of the --baseline ref) calls the `tasks.finalize` task body for every group, against a
private redis-server: `repeat` passes, each after removing every status.json and
final_results.csv (so each pass takes the full path). Prints CPU ms per group
(getrusage: user + system, and user alone), the median over passes, and checks that both trees
wrote the same bytes (status.json: except finished_at). Exit status 1 if they differ.
"""

from __future__ import annotations

import argparse
import gc
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


def _train(root: Path, groups: int, folds: int, work: Path) -> list[list[dict]]:
    from orchestrator.execution.runner import WorkerInfo, execute
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand
    from orchestrator.experiment.expand import groups as by_group
    from orchestrator.paths import Layout

    values = [round(0.001 * (i + 1), 6) for i in range(groups)]
    cfg = work / "bench.yaml"
    cfg.write_text(f"experiment: fin\ntrainer: prior\ndatasets: [iris]\nfolds: {folds}\n"
                   f"holdout: 0.2\nseeds: [0]\nsweep:\n  grid:\n    smoothing: {json.dumps(values)}\n")
    layout = Layout(root)
    worker = WorkerInfo(name="bench@host", device="cpu", gpu=None, host="host")
    out = []
    for group in by_group(expand(load_experiments([str(cfg)])[0])):
        for spec in group:
            execute(spec, layout, worker, 1)
        out.append([s.to_dict() for s in group])
    return out


def _child(root: Path, specs_file: Path, repeat: int) -> None:
    """Runs in the tree under test: the environment names the root and the Redis."""
    from orchestrator.experiment.spec import RunSpec
    from orchestrator.paths import Layout
    from tasks.training import finalize

    groups = json.loads(specs_file.read_text())
    experiment = groups[0][0]["experiment"]
    layout = Layout(root)
    statuses = [layout.group_status(RunSpec.from_dict(g[0])) for g in groups]
    times = []
    for _ in range(repeat):
        for path in statuses:
            path.unlink(missing_ok=True)
        layout.final_results(experiment).unlink(missing_ok=True)
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF)
        for group in groups:
            finalize(None, group)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        times.append([(user + system) * 1000 / len(groups), user * 1000 / len(groups)])
    print(json.dumps(times))


def _outputs(root: Path) -> dict[str, bytes]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            data = path.read_bytes()
            if path.name == "status.json":
                record = json.loads(data)
                record.pop("finished_at", None)
                data = json.dumps(record, sort_keys=True).encode()
            found[str(path.relative_to(root))] = data
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", default="main", help="git ref to compare with")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "SPECS", "REPEAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return 0

    sys.path.insert(0, str(REPO))
    from benchmarks.trees import export_ref
    from orchestrator.cluster.local import start_redis, stop_process

    print("$", " ".join([os.path.basename(sys.executable), *sys.argv]))
    work = Path(tempfile.mkdtemp(prefix="finalize-cpu-"))
    redis_proc = None
    try:
        base = export_ref(args.baseline, work / "baseline")
        redis_proc, url = start_redis(work / "redis")
        source = work / "source"
        groups = _train(source, args.groups, args.folds, work)
        specs_file = work / "specs.json"
        specs_file.write_text(json.dumps(groups))
        trees = {f"baseline ({args.baseline})": base, "this tree": REPO}
        times: dict[str, list[list[float]]] = {label: [] for label in trees}
        roots = {}
        for db, label in enumerate(trees, start=1):
            roots[label] = work / f"root{db}"
            shutil.copytree(source, roots[label])
        for _ in range(2):  # alternate the trees: drifting machine load hits both
            for db, (label, tree) in enumerate(trees.items(), start=1):
                env = {**os.environ, "PYTHONPATH": str(tree), "ORCH_RESULTS_ROOT": str(roots[label]),
                       "ORCH_BROKER_URL": url.rsplit("/", 1)[0] + f"/{db}"}
                env.pop("ORCH_STATE_URL", None)
                env.pop("ORCH_RESULT_BACKEND", None)
                # This script, importing the tree's orchestrator and tasks (PYTHONPATH).
                proc = subprocess.run([sys.executable, __file__, "--child", str(roots[label]),
                                       str(specs_file), str(args.repeat)],
                                      env=env, capture_output=True, text=True, cwd=tree)
                if proc.returncode:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                times[label] += json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{args.groups} groups x {args.folds} folds (prior on iris), {2 * args.repeat} passes per tree, "
              "CPU ms per group of the tasks.finalize body (getrusage, user+sys and user only):")
        medians = {}
        for label, t in times.items():
            total, user = (statistics.median(x[i] for x in t) for i in (0, 1))
            medians[label] = (total, user)
            print(f"  {label:<22} user+sys median {total:6.2f}  user median {user:6.2f}   "
                  f"passes (user+sys) {' '.join(f'{x[0]:.2f}' for x in t)}")
        (base_total, base_user), (total, user) = medians.values()
        print(f"  this/baseline: user+sys {total / base_total:.2f}, user {user / base_user:.2f}")
        outputs = [_outputs(roots[label]) for label in trees]
        differ = sorted(k for k in outputs[0].keys() | outputs[1].keys()
                        if outputs[0].get(k) != outputs[1].get(k))
        if differ:
            print(f"OUTPUTS DIFFER in {len(differ)} files, e.g. {differ[:5]}")
            return 1
        print(f"outputs identical: {len(outputs[0])} files (status.json except finished_at)")
        return 0
    finally:
        if redis_proc is not None:
            stop_process(redis_proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
