"""CPU and control workers forked from a warm supervisor (`workers up`).

The supervisor imports what these workers need once, before it starts the first one
(Celery, the app's task modules and, for CPU workers, the trainers'
preloads such as torch: imports only, CUDA stays uninitialised, design invariant 5),
then forks each of them, and each restart, from itself: a worker starts with all of it
loaded instead of importing it in two new interpreters (~2.4 s of CPU per worker).
The child runs the same `orchestrator worker` command, with the supervisor's
environment for it, and Celery in its own process (orchestrator.cli.worker), so
signals and `workers down` work as before. GPU workers are still exec'd (forkable).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .forkserver import Forked, fork_child, freeze, preload

_loaded = False
GPU_FLAGS = ("--gpu", "--gpus")


def forkable(argv: list[str]) -> bool:
    """An `orchestrator worker` command for the CPU or `control`. GPU workers are exec'd as
    before: /proc/PID/environ (what `ps e` and tools show) is the environment a process was
    exec'd with, and a GPU worker's must name its CUDA_VISIBLE_DEVICES."""
    return argv[1:4] == ["-m", "orchestrator", "worker"] and not any(f in argv for f in GPU_FLAGS)


def load(env: Mapping[str, str], commands: Sequence[Any]) -> None:
    """Import what the workers of `commands` need, once. A failure only costs time: each
    worker then imports for itself (and says what fails in its log)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Read by billiard at import: what each worker would get (orchestrator.cli.worker).
    os.environ["REMAP_SIGTERM"] = env.get("REMAP_SIGTERM", "SIGQUIT")
    trains = any(forkable(c.argv) and "--cpu" in c.argv for c in commands)
    try:
        preload(trains and env.get("ORCH_PRELOAD", "1") not in ("0", "false", "no"))
    except Exception:
        traceback.print_exc()
    freeze()


# What a forked worker runs (`orchestrator ARGS`): orchestrator.cli's main, which the CLI
# sets here at its import (the cluster layer does not import the CLI). The supervisor
# that forks is itself an `orchestrator workers` command: it is always set there.
entry: Callable[[], None] | None = None


def start(args: list[str], env: Mapping[str, str], log: Path, commands: Sequence[Any]) -> Forked:
    """Fork `orchestrator ARGS` (a worker command) with `env` as its whole environment; it
    gets SIGTERM if this process dies."""
    load(env, commands)

    def run() -> int:
        if entry is None:
            raise RuntimeError("orchestrator.cli registers the forked workers' entry point at its import")
        sys.argv = ["orchestrator", *args]
        entry()
        return 0

    return Forked(fork_child(run, env, str(log), deathsig=signal.SIGTERM, replace_env=True))
