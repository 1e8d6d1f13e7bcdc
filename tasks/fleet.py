"""Worker-side fleet hooks, connected through Celery signals, as daemon threads in the
worker's MAIN process (worker_ready and worker_shutdown are sent there only), never in
the pool children that train:

- heartbeat: writes this worker's record (orchestrator.cluster.registry) every few seconds, with a
  TTL of three heartbeats; deletes it at shutdown.
- exit when idle (ORCH_EXIT_WHEN_IDLE, tasks.idle), started here with the heartbeat.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from orchestrator import keys
from orchestrator.cluster import registry

from .idle import idle_loop

log = logging.getLogger(__name__)
_gpu_usage = registry.add_gpu_usage  # (tests call it by this name)

_stop = threading.Event()
_lock = threading.Lock()
_record: registry.WorkerRecord | None = None
_client: redis.Redis | None = None


def _busy() -> int:
    """Tasks this worker holds: reserved (waiting for the pool), running, or ETA-scheduled."""
    from celery.worker import state

    for _ in range(5):  # the consumer changes these while we read them: retry on a clash
        with contextlib.suppress(RuntimeError):
            return len({*list(state.requests), *(r.id for r in list(state.active_requests)),
                        *(r.id for r in list(state.reserved_requests))})
    return 1  # unknown: count as busy, so neither idle exit nor "idle" is claimed


def _beat() -> None:
    """Write this worker's record now: busy or idle from the requests it holds."""
    with _lock:
        if _record is None or _client is None or _stop.is_set():
            return
        busy = _busy()
        if _record.state != registry.WorkerState.STOPPING.value:
            _record.state = (registry.WorkerState.BUSY if busy else registry.WorkerState.IDLE).value
        _record.active, _record.heartbeat = busy, time.time()
        registry.add_gpu_usage(_record)
        registry.register(_client, _record, registry.record_ttl(registry.heartbeat_seconds()))


def _heartbeat_loop(interval: float) -> None:
    while not _stop.wait(interval):
        try:
            _beat()
        except Exception as exc:  # Redis restarting, network blip: try again next beat
            log.warning("worker registry heartbeat failed: %s", exc)


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Register this worker and start its heartbeat (and idle watch) threads."""
    global _record, _client
    if _record is not None:  # the consumer restarted (broker reconnect): threads run already
        return
    app = sender.app
    queues = sorted(app.amqp.queues.consume_from.keys())
    interval = registry.heartbeat_seconds()
    exit_idle = registry.exit_when_idle()
    now = time.time()
    _client = keys.client(app.conf.orch_state_url)
    _record = registry.WorkerRecord(
        name=sender.hostname, host=sender.hostname.split("@", 1)[-1], pid=os.getpid(), gpu=registry.worker_gpu(),
        device=registry.worker_device(queues), queues=queues, state=registry.WorkerState.IDLE.value, started=now,
        heartbeat=now, exit_when_idle=exit_idle)
    try:
        _beat()
    except Exception as exc:
        log.warning("worker registry: first heartbeat failed: %s", exc)
    atexit.register(_unregister)
    threading.Thread(target=_heartbeat_loop, args=(interval,), name="orch-heartbeat", daemon=True).start()
    if exit_idle is not None:
        threading.Thread(target=idle_loop, args=(app, queues, exit_idle, _stop, _busy, _stopping),
                         name="orch-exit-when-idle", daemon=True).start()


@worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    """Runs inside the signal handler: only flag the state; the next beat writes it."""
    _stopping()


def _stopping() -> None:
    if _record is not None:
        _record.state = registry.WorkerState.STOPPING.value


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    _unregister()


def _unregister() -> None:
    """Remove this worker's record: at worker_shutdown (warm), or at exit, because a cold
    shutdown (SIGQUIT, or SIGTERM remapped to it) never sends worker_shutdown."""
    _stop.set()
    with _lock:
        if _record is None or _client is None or os.getpid() != _record.pid:
            return  # not started, or a forked pool child
        try:
            registry.unregister(_client, _record.name, _record.pid)
        except Exception as exc:  # the record expires on its own
            log.warning("worker registry: could not remove %s: %s", _record.name, exc)
