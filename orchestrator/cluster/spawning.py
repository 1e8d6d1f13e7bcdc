"""Start a process in its own session that dies with this one (Linux)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def die_with_parent(sig: int, handled: bool = False) -> Callable[[], None]:
    """A child's setup: its own session, `sig` when this process dies; `handled`: `sig`
    blocked until the program unblocks it with its handler installed (an exec keeps the
    signal mask), so that one sent before then waits for that handler."""
    def setup() -> None:
        os.setsid()
        if handled:
            signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, sig)  # PR_SET_PDEATHSIG

    return setup


def spawn(argv: list[str], env: dict[str, str], log: Path, deathsig: int = signal.SIGTERM,
          handled: bool = False) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, logging to `log`; it gets `deathsig` when this
    process dies (Linux); `handled`: see die_with_parent."""
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(deathsig, handled))
