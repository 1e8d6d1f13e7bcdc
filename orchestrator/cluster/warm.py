"""Workers forked from a warm supervisor (`workers up`): GPU, CPU and control workers.

The supervisor imports what these workers need once, before it starts the first one
(Celery, the app's task modules, scikit-learn and, for training workers, the trainers' preloads
such as torch: imports only, CUDA stays uninitialised, design invariant 5), then forks
each of them, and each restart, from itself: a worker starts with all of it loaded
instead of importing it in two new interpreters (~2.4 s of CPU per worker, and torch).
The child runs the same `orchestrator worker` command, with the supervisor's
environment for it, and Celery in its own process (orchestrator.cli.worker), so
signals and `workers down` work as before.

A GPU worker's CUDA_VISIBLE_DEVICES is set in the child's os.environ (and so in its C
environment, which the CUDA runtime reads when it initialises: in the pool process that
trains, never here). Its /proc/PID/environ, the environment a process was exec'd with,
is the supervisor's: `orchestrator workers list` and the worker's record say which GPU
it owns.
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
TRAINING_FLAGS = ("--cpu", "--gpu", "--gpus")


def forkable(argv: list[str]) -> bool:
    """An `orchestrator worker` command (of a GPU, GPUs, the CPU or `control`)."""
    return argv[1:4] == ["-m", "orchestrator", "worker"]


def load(env: Mapping[str, str], commands: Sequence[Any]) -> None:
    """Import what the workers of `commands` need, once. A failure only costs time: each
    worker then imports for itself (and says what fails in its log)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Read by billiard at import: what each worker would get (orchestrator.cli.worker).
    os.environ["REMAP_SIGTERM"] = env.get("REMAP_SIGTERM", "SIGQUIT")
    trains = any(forkable(c.argv) and any(f in c.argv for f in TRAINING_FLAGS) for c in commands)
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
