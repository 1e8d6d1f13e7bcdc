"""Start a process in its own session that dies with this one (Linux)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def die_with_parent(sig: int) -> Callable[[], None]:
    def setup() -> None:
        os.setsid()
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, sig)  # PR_SET_PDEATHSIG

    return setup


def spawn(argv: list[str], env: dict[str, str], log: Path, deathsig: int = signal.SIGTERM) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, logging to `log`; it gets `deathsig` when this
    process dies (Linux)."""
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(deathsig))
