"""Fixtures: a real redis-server (own port, own directory) and real Celery workers.

Never the machine's default Redis, never a flush of anyone else's data: every server
here is started by the test session on a free port and stopped at its end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cluster.local import spawn, start_redis, stop_process, stop_processes

REPO = Path(__file__).resolve().parents[1]

# Modules whose fixtures start a cluster once per module (Redis and several workers:
# 10-20 s each). Under `--dist loadgroup` (pyproject.toml) each runs all its tests in one
# test process, so its cluster starts once, not once in each of the three processes that
# `load` would spread its tests over. Every other test is spread one by one.
# Longest first (their seconds in a full run): they are handed out in this order.
CLUSTER_MODULES = ("test_faults", "test_roles_cluster", "test_search", "test_data_parallel", "test_multihost",
                   "test_data_parallel_hosts", "test_return_mode",
                   "test_acl", "test_hostile", "test_report", "test_watch")


def _module(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return module.__name__.rpartition(".")[2] if module else ""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the cluster modules' tests as one xdist group each, and hand those long
    groups out first (longest work first: the short single tests then fill the gaps
    instead of a long group starting last and running on alone)."""
    for item in items:
        if _module(item) in CLUSTER_MODULES:
            item.add_marker(pytest.mark.xdist_group(_module(item)))
    order = {name: i for i, name in enumerate(CLUSTER_MODULES)}
    items.sort(key=lambda item: order.get(_module(item), len(order)))  # stable within a module


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for orchestrator subprocesses: test trainers, wide terminal, no broker.

    A training worker preloads only the `slow` test trainer (nothing), not mlp's torch
    and AdamW warm-up: 2.4-3.3 s of CPU saved per `orchestrator worker` a test starts
    (tests/ start about 70), paid instead by the first mlp run of a pool process that
    has one. Modules whose timing needs mlp warm (data-parallel gangs) set it back.
    `orchestrator run` and `orch.local()` set their own from the experiment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(PYTHONPATH=str(REPO), COLUMNS="250", ORCH_TRAINER_MODULES="tests.plugins",
               PYTHONUNBUFFERED="1", ORCH_PRELOAD_TRAINERS="slow")
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the CLI; whatever the outcome, it must never print a Python traceback."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    for noise in ("Traceback (most recent call last)", "Exception ignored"):
        assert noise not in proc.stderr, f"`orchestrator {' '.join(args)}` printed:\n{proc.stderr}"
    return proc


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition",
             seen: Callable[[], Any] | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`,
    saying what `seen()` returns then (the state the condition looked at), if given."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}"
                        + (f"; seen: {seen()!r}" if seen else ""))
        time.sleep(0.1)


@pytest.fixture
def write_experiment(tmp_path: Path) -> Callable[..., Path]:
    """Write an experiment YAML from keyword fields; returns its path."""

    def write(name: str = "exp", filename: str | None = None, **fields: Any) -> Path:
        doc = {"experiment": name, **fields}
        path = tmp_path / (filename or f"{name}.yaml")
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


def _redis(folder: Path) -> Iterator[str]:
    proc, url = start_redis(folder)
    try:
        yield url
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the whole session (of this test process)."""
    yield from _redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for one module: its registry and queues hold only what
    that module's tests put there."""
    yield from _redis(tmp_path_factory.mktemp("module-redis"))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty redis-server for one test."""
    yield from _redis(tmp_path / "redis")


@dataclass
class RestartableRedis:
    """A private redis-server that persists every write (append-only, fsync always) and
    can be killed and started again on its port with its data: a Redis restart."""

    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    keeper: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import shutil

        import redis

        exe = shutil.which("redis-server")
        assert exe, "redis-server is needed (scripts/install.sh installs it)"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                           "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                           "--logfile", str(self.folder / "redis.log")], dict(os.environ), self.folder / "redis.out")
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _answers(client), timeout=20, what="redis-server to answer")

    def kill(self) -> None:
        import signal

        assert self.proc is not None
        stop_process(self.proc, sig=signal.SIGKILL)
        self.proc = None
        self.keeper.set()  # the thread that started it (restart_soon) may end

    def restart_soon(self, after: float = 1.0) -> threading.Thread:
        """Kill it now (SIGKILL) and start it again with its data `after` seconds later,
        from a thread that lives as long as the new server: spawn() ties a child to the
        thread that started it (its parent-death signal)."""
        self.kill()
        self.keeper = threading.Event()
        keeper = self.keeper
        started = threading.Event()

        def restart() -> None:
            time.sleep(after)
            self.start()
            started.set()
            keeper.wait()

        threading.Thread(target=restart, daemon=True).start()
        waiter = threading.Thread(target=lambda: started.wait(60))
        waiter.start()
        return waiter


def _answers(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    """A fresh RestartableRedis for one test (stopped at its end)."""
    from orchestrator.cluster.local import free_port

    server = RestartableRedis(tmp_path / "restartable-redis", free_port())
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            stop_process(server.proc)
        server.keeper.set()


@dataclass
class Cluster:
    url: str
    root: Path
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]]

    def env(self, **extra: str) -> dict[str, str]:
        """Its workers preload mlp as a real one does (test_cluster checks where torch is)."""
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root),
                       **{"ORCH_PRELOAD_TRAINERS": "mlp", **extra})

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def celery_app(url: str) -> Any:
    """A client app with the project's settings, pointed at `url`."""
    from celery import Celery

    app = Celery("test-client")
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=url, result_backend=url)
    return app


@pytest.fixture(scope="session")
def running_cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """2 CPU workers and a control worker, started like an operator would."""
    root = tmp_path_factory.mktemp("cluster-results")
    logs = tmp_path_factory.mktemp("cluster-logs")
    cluster = Cluster(redis_url, root, logs, {})
    env = cluster.env()
    base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
    specs = {"cpu1": [*base, "--cpu", "--accept-gpu-runs", "--name", "cpu1@%h"],
             "cpu2": [*base, "--cpu", "--accept-gpu-runs", "--name", "cpu2@%h"],
             "control": [*base, "--control"]}
    for name, argv in specs.items():
        cluster.processes[name] = spawn(argv, env, logs / f"{name}.log")
    app = celery_app(redis_url)
    try:
        wait_for(lambda: len(app.control.ping(timeout=0.5)) >= 3, timeout=60, what="3 workers to answer ping")
        yield cluster
    finally:
        stop_processes(cluster.processes.values())
