"""One parent for the workers of local mode: it imports Celery, the app, its task
modules, scikit-learn and the experiment's trainers once, then forks every worker
(`celery worker` with its own arguments and environment) from itself.

    python -m orchestrator.cluster.forkserver PLAN.json

Why: local mode started each worker as two interpreters (`orchestrator worker`, then
`celery worker`) that imported the same ~1700 modules, three of them at once on two
cores: ~2.3 s of CPU per worker before it consumed. Forked from here, a worker starts
with all of it loaded.

The plan (LocalCluster writes it): `broker` (waited for before forking), `preload`
(import the trainers' own dependencies too), `workers` (name, celery argv, environment
changes, log file), `pids` (written once every worker is forked: name -> pid) and
`exits` (a line `name exit-code` per worker that ends). Each worker runs in its own
session (its pool processes in its process group, so one killpg stops them all) and
gets SIGKILL if this process dies; this process gets SIGKILL if `run` dies, and it is a
subreaper: it reaps the workers and their orphaned pool processes, and exits once none
is left. Nothing here initialises CUDA: trainers' preloads only import (design
invariant 5); each training worker forks its own pool process, which trains.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# What a `celery worker` of this app imports as it starts (besides the app's own task
# modules, tasks.MODULES): its CLI (with the plugins it loads), the worker, its pool,
# the Redis transport and backend.
CELERY_MODULES = ("celery.bin.celery", "celery.apps.worker", "celery.worker.consumer",
                  "celery.worker.components", "celery.worker.control", "celery.worker.autoscale",
                  "celery.concurrency.prefork", "celery.backends.redis", "kombu.transport.redis",
                  "celery.events.dispatcher", "celery.events.state")
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def preload(trainers: bool) -> None:
    """Import what every worker needs; `trainers`: each (selected) trainer's preload too."""
    for name in CELERY_MODULES:
        importlib.import_module(name)
    import tasks

    for name in tasks.MODULES:
        importlib.import_module(name)
    from orchestrator import settings
    from orchestrator.experiment.datasets import warm_up
    from orchestrator.trainers import registry

    warm_up()
    try:
        found = registry()
    except Exception:  # each training worker says why in its log and stops (tasks.training)
        return
    only = settings.value("ORCH_PRELOAD_TRAINERS")
    for trainer in found.values():
        if trainers and trainer.preload is not None and (only is None or trainer.name in only):
            try:
                trainer.preload()
            except Exception:  # the worker logs it when it preloads again (at no cost then)
                traceback.print_exc()


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


def fork_worker(worker: dict[str, Any]) -> int:
    """Fork one worker; in the child, run `celery <argv>` and never return."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # this process died before the prctl
            os._exit(1)
        log = os.open(worker["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        for key, value in worker["env"].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = ["celery", *worker["argv"]]
        from celery.bin.celery import main as celery_main

        code = celery_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    plan = json.loads(Path(args[0]).read_text())
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    preload(bool(plan["preload"]))
    wait_for_broker(plan["broker"])
    pids = {worker["name"]: fork_worker(worker) for worker in plan["workers"]}
    done = Path(plan["pids"])
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids))
    os.replace(tmp, done)
    return reap(pids, Path(plan["exits"]))


if __name__ == "__main__":
    sys.exit(main())
