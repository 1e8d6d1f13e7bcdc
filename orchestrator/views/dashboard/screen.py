"""The dashboard's live screen: collect in the background, redraw, read keys, quit cleanly."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import redis
from rich.console import Console, RenderableType

from ... import keys
from .render import render
from .snapshot import Collector, Snapshot

# --- the live screen ------------------------------------------------------------

class _Keys:
    """Keys from a terminal in cbreak mode (no echo, no line buffering; Ctrl-C still
    sends SIGINT); the terminal's settings come back on exit, whatever happened."""

    def __init__(self, stream: Any):
        self.fd = stream.fileno()
        self.saved: Any = None

    def __enter__(self) -> _Keys:
        import termios
        import tty

        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        if self.saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        try:
            data = os.read(self.fd, 64)
        except OSError:
            return ""
        if not data:  # the terminal went away
            raise EOFError
        return data.decode(errors="replace")


class _Quit(Exception):
    """SIGTERM or SIGHUP: leave the screen as Ctrl-C does."""


_hung_up = threading.Event()  # after SIGHUP the terminal may be gone: writes to it fail


@contextlib.contextmanager
def _quit_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        _hung_up.set()
        raise _Quit(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def watch(collector: Collector, console: Console, interval: float = 1.0) -> None:
    """The full-screen view until `q`, Ctrl-C, SIGTERM or SIGHUP. Collecting runs in a
    background thread, so keys are answered at once even while Redis is slow."""
    from rich.live import Live

    latest = [collector.collect()]
    fresh = threading.Event()
    stop = threading.Event()

    def collect_loop() -> None:
        while not stop.wait(interval):
            latest[0] = collector.collect()
            fresh.set()

    thread = threading.Thread(target=collect_loop, name="watch-collect", daemon=True)
    ascii_only = not (console.encoding or "").lower().startswith("utf")

    def frame() -> RenderableType:
        return render(latest[0], console.width, console.height, ascii_only, interval)

    try:
        with _quit_on_signals(), _Keys(sys.stdin) as keys, \
                Live(frame(), console=console, screen=True, auto_refresh=False,
                     redirect_stdout=False, redirect_stderr=False) as live:
            thread.start()
            size = console.size
            while True:
                pressed = keys.read(0.1)
                if "q" in pressed.lower():
                    return
                if fresh.is_set() or console.size != size or "r" in pressed.lower():
                    fresh.clear()
                    size = console.size
                    live.update(frame(), refresh=True)
    except (KeyboardInterrupt, _Quit, EOFError):
        return
    except OSError:
        if not _hung_up.is_set():
            raise
    finally:
        stop.set()


def once(collector: Collector, console: Console) -> Snapshot:
    snap = collector.collect()
    ascii_only = not (console.encoding or "").lower().startswith("utf")
    console.print(render(snap, console.width, None, ascii_only))
    return snap


def redis_client(url: str) -> redis.Redis:
    """Short timeouts: a watch that cannot reach Redis says so within seconds."""
    return keys.client(url, "command")
