"""One parent for the workers of local mode: it imports Celery, the app, its task
modules, scikit-learn and the experiment's trainers once, then forks every worker
(`celery worker` with its own arguments and environment) from itself.

    python -m orchestrator.cluster.forkserver PLAN.json [PARENT-PID]

Why: local mode started each worker as two interpreters (`orchestrator worker`, then
`celery worker`) that imported the same ~1700 modules, three of them at once on two
cores: ~2.3 s of CPU per worker before it consumed. Forked from here, a worker starts
with all of it loaded.

The plan (LocalCluster writes it): `broker` (waited for before forking), `preload`
(import the trainers' own dependencies too), `workers` (name, celery argv, environment
changes, log file), `pids` (written once every worker is forked: name -> pid) and
`exits` (a line `name exit-code` per worker that ends). Each worker runs in its own
session (its pool processes in its process group, so one killpg stops them all) and
gets SIGKILL if this process dies. This process is a subreaper: it reaps the workers and
their orphaned pool processes, and exits once none is left. It gets SIGTERM if `run`
dies (kill -9 of `run`: its Redis gets SIGKILL then), and is the one left
to clean up: it kills every worker's process group, reaps them and removes local mode's
folder (the plan's), which nobody else would (teardown). Nothing here initialises CUDA: trainers' preloads only import (design
invariant 5); each training worker forks its own pool process, which trains.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

# What a `celery worker` of this app imports as it starts (besides the app's own task
# modules, tasks.MODULES): its command (not Celery's umbrella CLI: celery_main), the
# worker, its pool, the Redis transport and backend.
CELERY_MODULES = ("celery.bin.worker", "celery.app.utils", "celery.apps.worker", "celery.worker.consumer",
                  "celery.worker.components", "celery.worker.control", "celery.worker.autoscale",
                  "celery.concurrency.prefork", "celery.backends.redis", "kombu.transport.redis",
                  "celery.events.dispatcher", "celery.events.state")
PR_SET_CHILD_SUBREAPER = 36
_forked: list[int] = []  # the workers forked so far (each the leader of its process group)


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def preload(trainers: bool, only: str | None = None) -> None:
    """Import what every worker needs; `trainers`: each trainer's preload too (those named
    in `only`, comma-separated; default ORCH_PRELOAD_TRAINERS, else every one)."""
    preload_base()
    if trainers:
        if only is None:
            from .. import settings

            names = settings.value("ORCH_PRELOAD_TRAINERS")
            only = ",".join(names) if names else None
        preload_trainers(only)


def preload_base() -> None:
    """Celery, the app's task modules, scikit-learn's first-use work, the trainer registry."""
    for name in CELERY_MODULES:
        importlib.import_module(name)
    import tasks

    for name in tasks.MODULES:
        importlib.import_module(name)
    from orchestrator.experiment.datasets import warm_up
    from orchestrator.trainers import registry

    warm_up()
    with contextlib.suppress(Exception):  # each training worker says why in its log and stops
        registry()


def preload_trainers(only: str | None) -> None:
    """The trainers' preloads (imports only: CUDA stays uninitialised)."""
    from orchestrator.trainers import registry

    names = None if not only else {n.strip() for n in only.split(",")}
    try:
        found = registry()
    except Exception:  # (tasks.training: the worker stops with the reason in its log)
        return
    for trainer in found.values():
        if trainer.preload is not None and (names is None or trainer.name in names):
            try:
                trainer.preload()
            except Exception:  # the worker logs it when it preloads again (at no cost then)
                traceback.print_exc()


def read_plan(path: Path) -> dict[str, Any]:
    """The plan, once there: `orchestrator run` starts this server before it has one
    (orchestrator.cluster.prestart) and writes it atomically."""
    while not path.exists():
        time.sleep(0.01)
    return dict(json.loads(path.read_text()))


def freeze() -> None:
    """Everything imported so far out of the garbage collector's reach: Celery collects
    before it forks each pool process (celery#2927), and over this heap that full
    collection took 0.28 s of every worker's start (cProfile, a load of 8); the pages of
    the frozen objects also stay shared with the workers instead of being copied when the
    collector touches them. No full collection first: after the imports (torch's too) it
    found 165 unreachable objects in 0.18 s of the start; they stay, frozen."""
    gc.freeze()


def wait_for_broker(url: str, timeout: float = 15.0) -> None:
    """Until the private Redis answers (else a worker's first connection retries after 2 s)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        finally:
            client.close()


def fork_child(run: Callable[[], int | None], env: Mapping[str, str | None], log: str,
               deathsig: int = signal.SIGKILL, replace_env: bool = False) -> int:
    """Fork; in the child: its own session, `deathsig` when this process dies, output to
    `log`, `env` applied (None: removed; `replace_env`: the whole environment), then
    `run()`, whose result (or SystemExit) is its exit code. Returns the child's pid."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # A fresh interpreter's handlers, not this process's (a fork server's teardown, a
        # supervisor's stop) until the child installs its own (Celery does).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        _prctl(1, deathsig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # this process died before the prctl
            os._exit(1)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        if replace_env:
            os.environ.clear()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        code = run() or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        # What the interpreter's exit would do, without returning into the parent's code:
        # the exit functions (a worker's cold shutdown removes its registry record there,
        # tasks.fleet; logging flushes), then the exit.
        import atexit

        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def celery_main(args: list[str]) -> int:
    """`celery ARGS` in this process (the environment as it is now)."""
    sys.argv = ["celery", *args]
    if args[:3] == ["-A", "tasks", "worker"]:
        return worker_main(args[3:])
    from celery.bin.celery import main as celery_cli

    return celery_cli()


def worker_main(args: list[str]) -> int:
    """`celery -A tasks worker ARGS` as Celery's umbrella command runs it (the app found
    as -A finds it, its context object, CELERY_WORKER_ variables), without that command:
    importing it imports click_repl and every installed `celery.commands` plugin (Flower,
    with tornado), 0.2 s of CPU in every local cluster's fork server, never used by a
    worker. An app with user options of its own takes the umbrella command."""
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    app = find_app("tasks")
    if app.user_options.get("worker") or app.user_options.get("preload"):
        from celery.bin.celery import main as celery_cli

        return celery_cli()
    no_color = os.environ.get("NO_COLOR", "").lower() in ("1", "true", "yes", "on")
    obj = CLIContext(app=app, no_color=no_color, workdir=None, quiet=False)
    return int(worker.main(args=args, prog_name="celery worker", obj=obj,
                           auto_envvar_prefix="CELERY_WORKER") or 0)


def fork_worker(worker: dict[str, Any]) -> int:
    """Fork one worker of a plan: `celery <argv>` with its environment changes."""
    return fork_child(lambda: celery_main(worker["argv"]), worker["env"], worker["log"])


class Forked:
    """A child of fork_child, as much of subprocess.Popen as a supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # reaped elsewhere: gone, its code unknown
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def reap(pids: dict[str, int], exits: Path) -> int:
    """Reap every child (workers, and their pool processes once orphaned); record each
    worker's end; return once no child is left."""
    names = {pid: name for name, pid in pids.items()}
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid in names:
            with open(exits, "a") as fh:
                fh.write(f"{names[pid]} {os.waitstatus_to_exitcode(status)}\n")


def teardown(folder: Path | None, grace: float = 5.0) -> Callable[[int, FrameType | None], None]:
    """The SIGTERM handler: `run` died (PDEATHSIG), so nobody else stops the workers or
    removes `folder` (local mode's, unless ORCH_KEEP_LOCAL_LOGS). Kills every worker's
    process group, reaps what is left (within `grace`: whatever is not reaped then dies
    with this process, by its own PDEATHSIG), removes the folder and exits."""
    from .. import settings

    keep = False
    with contextlib.suppress(Exception):  # an invalid value: `run` says so (settings.check_all)
        keep = bool(settings.value("ORCH_KEEP_LOCAL_LOGS"))

    def handler(signum: int, frame: FrameType | None) -> None:
        for pid in list(_forked):
            for kill in (os.killpg, os.kill):  # (kill: one forked but not yet in its own group)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.01)
            except ChildProcessError:
                break
        if folder is not None and not keep and folder.name.startswith("orchestrator-local-"):
            for _ in range(20):  # a process of the dying cluster may still add a file
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    break
                time.sleep(0.05)
        os._exit(1)

    return handler


def mark(what: str, since: float) -> None:
    """A line of this server's log: when each step of the start ended (wall clock, and
    seconds since `since`), to see where a local cluster's start goes."""
    print(f"forkserver {os.getpid()}: {what} at {time.time():.3f} (+{time.monotonic() - since:.2f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    began = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    handler = teardown(Path(args[0]).parent)
    signal.signal(signal.SIGTERM, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # (blocked until now: spawning.spawn)
    if len(args) > 1 and os.getppid() != int(args[1]):  # `run` died before its PDEATHSIG was set
        handler(signal.SIGTERM, None)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    preload_base()
    mark("base imports done", began)
    plan = read_plan(Path(args[0]))
    mark("plan read", began)
    if plan["preload"]:
        preload_trainers(plan.get("trainers"))
        mark(f"trainers preloaded ({plan.get('trainers') or 'all'})", began)
    freeze()
    wait_for_broker(plan["broker"])
    pids = {}
    for worker in plan["workers"]:
        pids[worker["name"]] = pid = fork_worker(worker)
        _forked.append(pid)
    mark(f"{len(pids)} workers forked", began)
    done = Path(plan["pids"])
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids))
    os.replace(tmp, done)
    return reap(pids, Path(plan["exits"]))


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the teardown of every module imported above took 2-2.5 s at a load of
    # 6, and `run` waits for this process's end (the end of every worker) before it exits.
    os._exit(status)
