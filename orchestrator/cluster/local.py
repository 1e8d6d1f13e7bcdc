"""Local mode: a private redis-server and Celery workers as child processes.

The workers (of GPUs, the CPU and control) are forked from one fork server
(orchestrator.cluster.forkserver), which imports what they need once. Each
worker runs in its own process group (so stopping one stops its pool children too) and,
on Linux, gets SIGKILL if its parent dies (PR_SET_PDEATHSIG), as Redis does if the
orchestrator dies; the fork server gets SIGTERM then, kills its workers and removes the
working folder, so a killed orchestrator leaves no worker, no Redis and no folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from .. import keys, settings
from ..errors import EnvironmentProblem
from . import prestart
from .spawning import spawn

INSTALL_HINT = ("redis-server was not found on PATH. Install it (Debian/Ubuntu: "
                "`sudo apt-get install redis-server`; macOS: `brew install redis`), "
                "or point at a running cluster with --broker URL / ORCH_BROKER_URL.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal the process group, wait up to `grace` seconds, then SIGKILL it."""
    stop_processes([proc], sig, grace)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], sig: int = signal.SIGTERM,
                   grace: float = 10.0) -> None:
    """stop_process for several at once: every group is signalled first, then all are
    waited for within one `grace`, then what is left gets SIGKILL (a cluster of N workers
    stops in the time of its slowest, not in the sum of theirs)."""
    live = []
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
                live.append(proc)
    deadline = time.monotonic() + grace
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    for proc in live:
        proc.wait(timeout=10)


def launch_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private redis-server (see wait_redis); returns it and its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise EnvironmentProblem(INSTALL_HINT)
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            "--maxmemory-policy", "noeviction", "--logfile", str(workdir / "redis.log")]
    return spawn(argv, dict(os.environ), workdir / "redis.out"), f"redis://127.0.0.1:{port}/0"


def wait_redis(proc: subprocess.Popen[bytes], url: str, workdir: Path) -> None:
    """Until the Redis of launch_redis answers; EnvironmentProblem if it does not start."""
    client = keys.client(url, "command")
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                log = (workdir / "redis.log")
                tail = log.read_text()[-500:] if log.exists() else ""
                raise EnvironmentProblem(f"redis-server did not start at {url}:\n{tail}") from None
            time.sleep(0.02)


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    proc, url = launch_redis(workdir, port)
    wait_redis(proc, url, workdir)
    return proc, url


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
        """Start Redis and the workers' fork server (orchestrator.cluster.forkserver), which
        imports what the workers need once, while this process goes on, then forks them.
        (`orchestrator run` started that server first thing: cluster.prestart.)"""
        early = prestart.adopt() if not self.env else None  # (the API's trainers: its own)
        if early is not None:
            server, self.workdir, server_env = early
            self.processes["workers"] = server
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="orchestrator-local-"))
        redis_proc, self.broker_url = launch_redis(self.workdir / "redis")
        self.processes["redis"] = redis_proc
        env = {**os.environ, "ORCH_BROKER_URL": self.broker_url,
               "ORCH_RESULT_BACKEND": self.broker_url, "ORCH_STATE_URL": self.broker_url,
               "ORCH_RESULTS_ROOT": str(self.results_root),
               "ORCH_RESULTS_TRANSFER": "shared",  # one host: every worker sees the root
               # Cold stop on SIGTERM (read by billiard at import, so for all of them).
               "REMAP_SIGTERM": os.environ.get("REMAP_SIGTERM", "SIGQUIT"),
               **self.env}
        if self.preload is not None:
            env["ORCH_PRELOAD_TRAINERS"] = ",".join(self.preload)
        # The workers' temporary files (the pool's pymp-* folders among them) go inside
        # the working folder, which the stop removes: a killed pool leaves them behind.
        (self.workdir / "tmp").mkdir()
        env["TMPDIR"] = str(self.workdir / "tmp")
        plan = self.workdir / prestart.PLAN
        tmp = plan.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.fork_plan(env, server_env if early is not None else env)))
        os.replace(tmp, plan)  # an early server waits for it
        if early is None:
            # SIGTERM if this process dies (kill -9 of `run`): the server then kills its
            # workers (a cold shutdown would wait forever on the private Redis, which dies
            # with this process) and removes the working folder (forkserver.teardown).
            self.processes["workers"] = spawn(
                [sys.executable, "-m", "orchestrator.cluster.forkserver", str(plan), str(os.getpid())], env,
                self.workdir / "forkserver.log", deathsig=signal.SIGTERM, handled=True)
        wait_redis(redis_proc, self.broker_url, self.workdir / "redis")
        return self.broker_url

    def roles(self) -> dict[str, dict[str, Any]]:
        """Name -> the arguments of `orchestrator worker` (as keywords) of every worker."""
        workers: dict[str, dict[str, Any]] = {}
        for index in self.gpus:
            workers[f"gpu{index}"] = {"gpu": index}
        if not self.gpus or self.cpu_runs:
            # Without GPUs, CPU slots take the `gpu` queue too, so every run runs.
            for i in range(1, self.cpu_workers + 1):
                workers[f"cpu{i}"] = {"cpu": True, "accept_gpu_runs": not self.gpus, "name": f"cpu{i}@%h"}
        workers["control"] = {"control": True}
        return workers

    def worker_commands(self) -> dict[str, list[str]]:
        """Name -> the `orchestrator worker` command line that starts the same worker."""
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", self.loglevel]
        flags = {"gpu": lambda v: ["--gpu", str(v)], "cpu": lambda v: ["--cpu"] if v else [],
                 "accept_gpu_runs": lambda v: ["--accept-gpu-runs"] if v else [],
                 "name": lambda v: ["--name", v], "control": lambda v: ["--control"] if v else []}
        return {name: [*base, *(a for k, v in role.items() for a in flags[k](v))]
                for name, role in self.roles().items()}

    def fork_plan(self, env: dict[str, str], server_env: dict[str, str]) -> dict[str, Any]:
        """The fork server's plan: per worker its `celery` arguments, and its environment
        (`env` and that of celery_worker_command) as changes to `server_env`, the server's
        (a GPU worker's CUDA_VISIBLE_DEVICES among them: see cluster.warm)."""
        from ..cli.worker import celery_worker_command

        assert self.workdir is not None
        workers: list[dict[str, Any]] = []
        for name, role in self.roles().items():
            argv, wenv = celery_worker_command(**role, loglevel=self.loglevel, environ=env)
            changes: dict[str, str | None] = {k: v for k, v in wenv.items() if server_env.get(k) != v}
            changes.update({k: None for k in server_env if k not in wenv})
            workers.append({"name": name, "argv": argv[argv.index("celery") + 1:], "env": changes,
                            "log": str(self.workdir / f"{name}.log")})
        return {"broker": self.broker_url, "workers": workers, "trainers": env.get("ORCH_PRELOAD_TRAINERS"),
                "preload": any(w["env"].get("ORCH_PRELOAD", env.get("ORCH_PRELOAD")) == "1" for w in workers),
                "pids": str(self.workdir / "pids.json"), "exits": str(self.workdir / "exits")}

    def worker_pids(self) -> dict[str, int]:
        """Name -> pid (and process group) of each forked worker; {} before they are forked."""
        path = self.workdir / "pids.json" if self.workdir is not None else None
        if path is None or not path.exists():
            return {}
        return {k: int(v) for k, v in json.loads(path.read_text()).items()}

    def dead(self) -> list[str]:
        """Names of workers (or of `redis`, `workers`: the fork server) that exited on their own."""
        exits = self.workdir / "exits" if self.workdir is not None else None
        ended = [line.split()[0] for line in exits.read_text().splitlines() if line.strip()] \
            if exits is not None and exits.exists() else []
        return ended + [n for n, p in self.processes.items() if p.poll() is not None]

    def log_tail(self, name: str, chars: int = 1500) -> str:
        assert self.workdir is not None
        file = {"redis": "redis/redis.log", "workers": "forkserver.log"}.get(name, f"{name}.log")
        path = self.workdir / file
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, finished: bool = False) -> None:
        """Stop every process and remove the working folder. `finished`: every group is
        final, so nothing is in flight and nothing in this private Redis outlives it:
        the process groups are killed at once (a cold shutdown of three Celery workers
        took 3-7 s after the summary). Else (Ctrl-C, a failure) workers stop cold, handing
        back what they hold, as `workers down` does. The fork server reaps them all and
        exits once none is left: its end is the end of every worker and pool process."""
        sig = signal.SIGKILL if finished else signal.SIGTERM
        pids = self.worker_pids()
        for pid in pids.values():  # all first: they stop in parallel
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        server = self.processes.get("workers")
        if server is not None:
            if not pids:  # still importing, or forking: its workers die with it (PDEATHSIG)
                stop_process(server, signal.SIGKILL)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                for pid in pids.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                stop_process(server, signal.SIGKILL, grace=10)
        if "redis" in self.processes:
            stop_process(self.processes["redis"], sig, grace=5)
        if self.workdir is not None and not settings.value("ORCH_KEEP_LOCAL_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)
