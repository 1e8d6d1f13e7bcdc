"""The supervisor behind `workers up`: one process per host and state folder that starts
the `orchestrator worker` commands it is given, restarts a worker that exits with
exponential backoff, gives up on one that keeps crashing right after it starts, and
stops them cleanly: on SIGTERM at once (running runs are handed back to their queues),
on SIGINT after their current run (drain). Plain Python, no Celery: the workers are
subprocesses. (The registry the workers write is orchestrator.cluster.registry.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, cast

from .. import settings
from . import warm
from .forkserver import Forked
from .local import spawn
from .registry import node_name, this_host

# --- what `workers up` starts ---------------------------------------------------------

@dataclass(frozen=True)
class WorkerCommand:
    label: str  # gpu0, gpu0-1, cpu1, control: also the log file's name
    node: str  # Celery node name template, e.g. gpu0@%h
    gpu: int | None
    argv: list[str]


def worker_commands(gpus: list[int], per_gpu: int = 1, cpu: int = 0, control: bool = False,
                    accept_gpu_runs: bool = False, loglevel: str = "INFO",
                    exit_when_idle: float | None = None,
                    return_results: bool = False) -> list[WorkerCommand]:
    """One `orchestrator worker` per GPU (per_gpu each), `cpu` CPU workers, a control one;
    `return_results`: the training workers return their outputs through Redis."""
    base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", loglevel]
    if exit_when_idle is not None:
        base += ["--exit-when-idle", f"{exit_when_idle:g}"]
    train = [*base, "--return-results"] if return_results else base
    commands = []
    for index in gpus:
        for k in range(per_gpu):
            label = f"gpu{index}" if per_gpu == 1 else f"gpu{index}-{k}"
            commands.append(WorkerCommand(label, f"{label}@%h", index,
                                          [*train, "--gpu", str(index), "--name", f"{label}@%h"]))
    for i in range(1, cpu + 1):
        extra = ["--accept-gpu-runs"] if accept_gpu_runs else []
        commands.append(WorkerCommand(f"cpu{i}", f"cpu{i}@%h", None,
                                      [*train, "--cpu", *extra, "--name", f"cpu{i}@%h"]))
    if control:
        commands.append(WorkerCommand("control", "control@%h", None, [*base, "--control"]))
    return commands


def default_state_dir() -> Path:
    if (folder := settings.value("ORCH_STATE_DIR")) is not None:
        return Path(folder)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "orchestrator"


@dataclass(frozen=True)
class StateDir:
    """The files of one supervisor: plan, pid, lock, status and logs."""

    path: Path

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def pid_file(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def lock(self) -> Path:
        return self.path / "supervisor.lock"

    @property
    def status(self) -> Path:
        return self.path / "supervisor.json"

    @property
    def log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def running_pid(self) -> int | None:
        """The pid of the supervisor holding this folder's lock, or None."""
        if not self.lock.exists():
            return None
        with open(self.lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return int(self.pid_file.read_text().strip())
                except (OSError, ValueError):
                    return -1  # locked, pid file not written yet
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None

    def read_status(self) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], json.loads(self.status.read_text()))
        except (OSError, ValueError):
            return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_plan(state: StateDir, commands: list[WorkerCommand], exit_when_idle: bool) -> None:
    state.path.mkdir(parents=True, exist_ok=True)
    _write_json(state.plan, {"exit_when_idle": exit_when_idle,
                             "workers": [asdict(c) for c in commands]})


def read_plan(state: StateDir) -> tuple[list[WorkerCommand], bool]:
    data = json.loads(state.plan.read_text())
    return [WorkerCommand(**c) for c in data["workers"]], bool(data["exit_when_idle"])


# --- the supervisor -----------------------------------------------------------------

class ChildState(str, Enum):
    RUNNING = "running"  # process alive
    WAITING = "waiting"  # exited; restarts at next_start (backoff)
    FAILED = "failed"  # crashed max_failures times in a row right after starting: given up
    DONE = "done"  # left on its own when idle (--exit-when-idle): not restarted
    STOPPED = "stopped"  # stopped by the supervisor


@dataclass
class Child:
    command: WorkerCommand
    proc: subprocess.Popen[bytes] | Forked | None = None
    state: ChildState = ChildState.WAITING
    started: float = 0.0
    next_start: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive exits within stable_seconds of starting
    exit_codes: list[int] = field(default_factory=list)


@dataclass
class Supervisor:
    """Keeps `commands` running; `run()` returns when stopped or when nothing is left."""

    commands: list[WorkerCommand]
    state: StateDir
    env: dict[str, str]
    exit_when_idle: bool = False  # a worker that exits with 0 is done, not crashed
    stable_seconds: float = 60.0  # a worker up this long resets its crash count
    max_failures: int = 5  # consecutive fast crashes before giving up on a worker
    backoff_base: float = 1.0  # first restart delay; doubles per consecutive fast crash
    backoff_max: float = 60.0
    kill_after: float = 60.0  # SIGKILL what is still running this long after SIGTERM
    # Fork `orchestrator worker` commands from this process, which imports what they
    # need once (orchestrator.cluster.warm), instead of starting each in a new interpreter.
    warm: bool = True
    children: list[Child] = field(default_factory=list)
    _stop: str = ""  # "", "drain" or "now"

    def log(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor[{os.getpid()}]: {message}", flush=True)

    def _start(self, child: Child) -> None:
        self.state.logs.mkdir(parents=True, exist_ok=True)
        log = self.state.logs / f"{child.command.label}.log"
        if self.warm and warm.forkable(child.command.argv):
            child.proc = warm.start(child.command.argv[3:], self.env, log, self.commands)
        else:
            child.proc = spawn(child.command.argv, self.env, log)
        child.state, child.started = ChildState.RUNNING, time.monotonic()
        self.log(f"started {child.command.label} ({node_name(child.command.node)}) pid {child.proc.pid}")

    def _reap(self, child: Child, now: float) -> None:
        assert child.proc is not None and child.proc.returncode is not None
        code = child.proc.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)  # pool children of a killed main process
        child.exit_codes = [*child.exit_codes[-9:], code]
        label = child.command.label
        if self.exit_when_idle and code == 0:
            child.state = ChildState.DONE
            self.log(f"{label} left after being idle: done")
            return
        uptime = now - child.started
        child.failures = child.failures + 1 if uptime < self.stable_seconds else 1
        if child.failures > self.max_failures:
            child.state = ChildState.FAILED
            self.log(f"{label} exited {self.max_failures + 1} times in a row within "
                     f"{self.stable_seconds:g}s of starting (last exit code {code}); not restarting it. "
                     f"See {self.state.logs / (label + '.log')}")
            return
        delay = min(self.backoff_base * 2 ** (child.failures - 1), self.backoff_max)
        child.state, child.next_start = ChildState.WAITING, now + delay
        self.log(f"{label} exited with code {code} after {uptime:.1f}s; restarting in {delay:g}s")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # First SIGINT (Ctrl-C, `workers down --drain`): drain. SIGTERM, or a second SIGINT: now.
        self._stop = "drain" if signum == signal.SIGINT and not self._stop else "now"

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": this_host(), "stopping": self._stop,
                "workers": {c.command.label: {
                    "node": node_name(c.command.node), "gpu": c.command.gpu, "state": c.state.value,
                    "pid": c.proc.pid if c.proc and c.state == ChildState.RUNNING else None,
                    "restarts": c.restarts, "exit_codes": c.exit_codes,
                    "log": str(self.state.logs / f"{c.command.label}.log")} for c in self.children}}

    def run(self) -> int:
        self.state.path.mkdir(parents=True, exist_ok=True)
        with open(self.state.lock, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.log(f"another supervisor holds {self.state.lock}; not starting")
                return 3
            self.state.pid_file.write_text(f"{os.getpid()}\n")
            try:
                return self._run()
            finally:
                self.state.pid_file.unlink(missing_ok=True)

    def _run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        self.children = [Child(c) for c in self.commands]
        for child in self.children:
            self._start(child)
        last = ""
        while not self._stop:
            now = time.monotonic()
            for child in self.children:
                if child.state == ChildState.RUNNING and child.proc and child.proc.poll() is not None:
                    self._reap(child, now)
                if child.state == ChildState.WAITING and now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
            status = self.status()
            if json.dumps(status) != last:
                _write_json(self.state.status, status)
                last = json.dumps(status)
            if all(c.state in (ChildState.FAILED, ChildState.DONE) for c in self.children):
                break
            time.sleep(0.2)
        if self._stop:
            self._shutdown()
        _write_json(self.state.status, self.status())
        failed = [c.command.label for c in self.children if c.state == ChildState.FAILED]
        self.log("stopped" + (f"; gave up on {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    def _running(self) -> Iterator[Child]:
        for child in self.children:
            if child.state == ChildState.RUNNING and child.proc and child.proc.poll() is None:
                yield child

    def _signal_all(self, sig: int) -> None:
        for child in self._running():
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, sig)  # the Celery main process handles its pool

    def _shutdown(self) -> None:
        """Drain: SIGINT, a Celery warm shutdown: each worker finishes its current run and
        takes no new one. Now: SIGTERM, which `orchestrator worker` maps to Celery's cold
        shutdown: a running run goes back to its queue at once, for another worker. What
        is left `kill_after` seconds after SIGTERM is killed."""
        mode = self._stop
        self.log(f"stopping {len(list(self._running()))} workers "
                 + ("(drain: each finishes its current run)" if mode == "drain"
                    else "(running runs go back to their queues)"))
        self._signal_all(signal.SIGINT if mode == "drain" else signal.SIGTERM)
        kill_at = None if mode == "drain" else time.monotonic() + self.kill_after
        while list(self._running()):
            if mode == "drain" and self._stop == "now":
                mode, kill_at = "now", time.monotonic() + self.kill_after
                self.log("stopping now: running runs go back to their queues")
                self._signal_all(signal.SIGTERM)
            if kill_at is not None and time.monotonic() > kill_at:
                self.log(f"killing workers still running {self.kill_after:g}s after SIGTERM")
                for child in self._running():
                    assert child.proc is not None
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                kill_at = None
            time.sleep(0.2)
        for child in self.children:
            if child.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)  # leftover pool children
                if child.state in (ChildState.RUNNING, ChildState.WAITING):
                    child.state = ChildState.STOPPED


