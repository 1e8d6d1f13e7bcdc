"""Local mode: a private redis-server and Celery workers as child processes.

Each child runs in its own process group (so stopping one stops its pool children too)
and, on Linux, gets SIGTERM if the orchestrator itself dies (PR_SET_PDEATHSIG), so a
killed orchestrator never leaves workers or Redis behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from .. import keys, settings
from ..errors import EnvironmentProblem

INSTALL_HINT = ("redis-server was not found on PATH. Install it (Debian/Ubuntu: "
                "`sudo apt-get install redis-server`; macOS: `brew install redis`), "
                "or point at a running cluster with --broker URL / ORCH_BROKER_URL.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None]:
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
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent(deathsig))


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal the process group, wait up to `grace` seconds, then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise EnvironmentProblem(INSTALL_HINT)
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            "--maxmemory-policy", "noeviction", "--logfile", str(workdir / "redis.log")]
    proc = spawn(argv, dict(os.environ), workdir / "redis.out")
    url = f"redis://127.0.0.1:{port}/0"
    client = keys.client(url, "command")
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                log = (workdir / "redis.log")
                tail = log.read_text()[-500:] if log.exists() else ""
                raise EnvironmentProblem(f"redis-server did not start on port {port}:\n{tail}") from None
            time.sleep(0.05)


@dataclass
class LocalCluster:
    """Redis + one worker per GPU (or `cpu_workers` CPU workers) + a control worker.

    With GPUs, CPU workers are added only when some run asks for no GPU (`cpu_runs`):
    otherwise such runs would wait on the `cpu` queue with nobody consuming it.
    """

    results_root: Path
    cpu_workers: int = 2
    gpus: list[int] = field(default_factory=list)
    cpu_runs: bool = False
    loglevel: str = "WARNING"
    preload: list[str] | None = None  # trainers the workers preload (None: every one)
    workdir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    broker_url: str = ""
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's, for every worker

    def start(self) -> str:
        self.workdir = Path(tempfile.mkdtemp(prefix="orchestrator-local-"))
        redis_proc, self.broker_url = start_redis(self.workdir / "redis")
        self.processes["redis"] = redis_proc
        env = {**os.environ, "ORCH_BROKER_URL": self.broker_url,
               "ORCH_RESULT_BACKEND": self.broker_url, "ORCH_STATE_URL": self.broker_url,
               "ORCH_RESULTS_ROOT": str(self.results_root),
               "ORCH_RESULTS_TRANSFER": "shared",  # one host: every worker sees the root
               **self.env}
        if self.preload is not None:
            env["ORCH_PRELOAD_TRAINERS"] = ",".join(self.preload)
        # The workers' temporary files (the pool's pymp-* folders among them) go inside
        # the working folder, which the stop removes: a killed pool leaves them behind.
        (self.workdir / "tmp").mkdir()
        env["TMPDIR"] = str(self.workdir / "tmp")
        for name, argv in self.worker_commands().items():
            # SIGKILL if this process dies (kill -9 of `run`): a cold shutdown would wait
            # forever on the private Redis, which dies with it. Their pool processes
            # exit when their worker's pipe closes.
            self.processes[name] = spawn(argv, env, self.workdir / f"{name}.log", deathsig=signal.SIGKILL)
        return self.broker_url

    def worker_commands(self) -> dict[str, list[str]]:
        """Name -> command line of every worker this cluster runs."""
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", self.loglevel]
        workers: dict[str, list[str]] = {}
        for index in self.gpus:
            workers[f"gpu{index}"] = [*base, "--gpu", str(index)]
        if not self.gpus or self.cpu_runs:
            # Without GPUs, CPU slots take the `gpu` queue too, so every run runs.
            extra = [] if self.gpus else ["--accept-gpu-runs"]
            for i in range(1, self.cpu_workers + 1):
                workers[f"cpu{i}"] = [*base, "--cpu", *extra, "--name", f"cpu{i}@%h"]
        workers["control"] = [*base, "--control"]
        return workers

    def dead(self) -> list[str]:
        """Names of children that exited on their own."""
        return [n for n, p in self.processes.items() if p.poll() is not None]

    def log_tail(self, name: str, chars: int = 1500) -> str:
        assert self.workdir is not None
        path = self.workdir / ("redis/redis.log" if name == "redis" else f"{name}.log")
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, finished: bool = False) -> None:
        """Stop every process and remove the working folder. `finished`: every group is
        final, so nothing is in flight and nothing in this private Redis outlives it:
        the process groups are killed at once (a cold shutdown of three Celery workers
        took 3-7 s after the summary). Else (Ctrl-C, a failure) workers stop cold, handing
        back what they hold, as `workers down` does."""
        workers = [p for n, p in self.processes.items() if n != "redis"]
        sig = signal.SIGKILL if finished else signal.SIGTERM
        for proc in workers:  # signal all first: they shut down in parallel
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        for proc in workers:
            stop_process(proc, sig, grace=15)
        if "redis" in self.processes:
            stop_process(self.processes["redis"], sig, grace=5)
        if self.workdir is not None and not settings.value("ORCH_KEEP_LOCAL_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)
