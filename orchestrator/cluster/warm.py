"""`orchestrator worker` commands forked from a warm supervisor (`workers up`).

The supervisor imports what its workers need once, before it starts the first one
(Celery, the app's task modules, scikit-learn and, for training workers, the trainers'
preloads such as torch: imports only, CUDA stays uninitialised, design invariant 5),
then forks each worker, and each restart, from itself: a worker starts with all of it
loaded instead of importing it in a new interpreter (~2.4 s of CPU per worker, and
`import torch` on GPU hosts). The child runs the same `orchestrator worker` command,
with the supervisor's environment for it, and Celery in its own process
(orchestrator.cli.worker), so signals and `workers down` work as before.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .forkserver import Forked, fork_child, preload

_loaded = False
TRAINING_FLAGS = ("--gpu", "--cpu", "--gpus")


def load(env: Mapping[str, str], commands: Sequence[Any]) -> None:
    """Import what the workers of `commands` need, once. A failure only costs time: each
    worker then imports for itself (and says what fails in its log)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Read by billiard at import: what each worker would get (orchestrator.cli.worker).
    os.environ["REMAP_SIGTERM"] = env.get("REMAP_SIGTERM", "SIGQUIT")
    trains = any(flag in c.argv for c in commands for flag in TRAINING_FLAGS)
    try:
        preload(trains and env.get("ORCH_PRELOAD", "1") not in ("0", "false", "no"))
    except Exception:
        traceback.print_exc()


def start(args: list[str], env: Mapping[str, str], log: Path, commands: Sequence[Any]) -> Forked:
    """Fork `orchestrator ARGS` (a worker command) with `env` as its whole environment; it
    gets SIGTERM if this process dies."""
    load(env, commands)

    def run() -> int:
        from ..cli import main

        sys.argv = ["orchestrator", *args]
        main()
        return 0

    return Forked(fork_child(run, env, str(log), deathsig=signal.SIGTERM, replace_env=True))
