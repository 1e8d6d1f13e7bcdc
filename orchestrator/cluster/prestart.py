"""`orchestrator run` without a broker: the workers' fork server starts first thing.

It imports for ~2 s of CPU (orchestrator.cluster.forkserver) and needs nothing from the
command until it forks, so `orchestrator run` starts it before it imports the rest of
its CLI (orchestrator.cli, first lines), loads the configs and builds the plan; LocalCluster adopts it and hands it
its plan. Not adopted (nothing to do, an error, --help), it is stopped and its folder
removed when the command exits. Only the standard library here: this runs before any
other import.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .spawning import spawn

PLAN = "forkserver.json"
_early: tuple[subprocess.Popen[bytes], Path, dict[str, str]] | None = None


def wanted(argv: list[str], env: Mapping[str, str]) -> bool:
    """`orchestrator run ...` in local mode (no --broker, no ORCH_BROKER_URL, no --help)."""
    args = argv[1:]
    command = os.path.basename(argv[0]) if argv else ""  # the console script, or python -m orchestrator
    return (command in ("orchestrator", "__main__.py") and args[:1] == ["run"] and not env.get("ORCH_BROKER_URL")
            and not any(a in ("-h", "--help") or a.startswith("--broker") for a in args))


def start(argv: list[str]) -> None:
    """Start the fork server now when `argv` is a local `run` (see wanted)."""
    global _early
    if not wanted(argv, os.environ) or _early is not None:
        return
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-local-"))
    # Read by billiard at import: every local worker stops cold on SIGTERM.
    env = {**os.environ, "REMAP_SIGTERM": os.environ.get("REMAP_SIGTERM", "SIGQUIT")}
    proc = spawn([sys.executable, "-m", "orchestrator.cluster.forkserver", str(workdir / PLAN), str(os.getpid())],
                 env, workdir / "forkserver.log", deathsig=signal.SIGTERM, handled=True)  # (forkserver.teardown)
    _early = (proc, workdir, env)
    atexit.register(_discard)


def adopt() -> tuple[subprocess.Popen[bytes], Path, dict[str, str]] | None:
    """The fork server started early, its folder and its environment; None if none was.
    Whoever adopts it stops it and removes the folder."""
    global _early
    early, _early = _early, None
    return early


def _discard() -> None:
    if _early is not None:
        proc, workdir, _ = _early
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
