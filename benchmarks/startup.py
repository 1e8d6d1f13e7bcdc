#!/usr/bin/env python
"""Start-up of an `orchestrator` command and of a worker's imports, with and without the
project's compiled bytecode.

    python benchmarks/startup.py [--repeat 15] [--ref HEAD]

Two copies of the tree at `ref` (`git archive`): one as a fresh checkout is (no
`__pycache__`), one compiled as scripts/install.sh compiles it. With
PYTHONDONTWRITEBYTECODE set (these machines, many containers) Python never writes what
it compiles, so the first copy compiles every module it imports in every process; the
variable is set for every process here either way. Per repeat, alternating the copies:
the wall time and CPU (user + system) of
  validate  `python -m orchestrator validate configs/iris_kfold.yaml`
  submit    the imports `orchestrator submit` needs before it publishes
            (orchestrator.cli, orchestrator.dispatch.canvas, orchestrator.views.progress)
  worker    what a worker process imports from the project (tasks, tasks.training)
Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dispatch import children_cpu  # noqa: E402
from benchmarks.trees import export_ref  # noqa: E402

COMMANDS = {
    "validate": ["-m", "orchestrator", "validate", "configs/iris_kfold.yaml"],
    "submit": ["-c", "import orchestrator.cli, orchestrator.dispatch.canvas, orchestrator.views.progress"],
    "worker": ["-c", "import tasks, tasks.training"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--ref", default="HEAD", help="git ref to measure (default HEAD)")
    args = parser.parse_args()
    print("$", " ".join([os.path.basename(sys.executable), *sys.argv]))
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        trees = {"no bytecode": export_ref(args.ref, work / "plain"),
                 "compiled": export_ref(args.ref, work / "compiled", compiled=True)}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {
            (label, cmd): [] for label in trees for cmd in COMMANDS}
        for _ in range(args.repeat):
            for cmd, argv in COMMANDS.items():
                for label, tree in trees.items():
                    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
                    env.update(PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
                    cpu0, t0 = children_cpu(), time.perf_counter()
                    subprocess.run([sys.executable, *argv], cwd=tree, env=env, check=True,
                                   capture_output=True)
                    times[label, cmd].append((time.perf_counter() - t0, children_cpu() - cpu0))
        print(f"medians of {args.repeat} (ref {args.ref}, nproc {os.cpu_count()}):")
        for cmd in COMMANDS:
            wall, cpu = ({label: statistics.median(t[i] for t in times[label, cmd]) for label in trees}
                         for i in (0, 1))
            print(f"  {cmd:<9} wall {wall['no bytecode']:.3f} -> {wall['compiled']:.3f} s "
                  f"(x{wall['compiled'] / wall['no bytecode']:.2f})   cpu {cpu['no bytecode']:.3f} -> "
                  f"{cpu['compiled']:.3f} s (x{cpu['compiled'] / cpu['no bytecode']:.2f})")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
