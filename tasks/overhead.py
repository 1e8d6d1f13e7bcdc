"""Two cuts in what Celery and kombu spend on each task in a worker; what they send is unchanged.

Measured with 2 training workers and a control worker running 1000 `prior` runs, a
worker's main process spent about 3 ms of CPU per task beside the pool process's run;
these two were half of it.

1. One Redis client per kombu channel (`share_channel_clients`). kombu's Redis transport
   builds a new `redis.Redis` for every command it sends without a client
   (`Channel.conn_or_acquire`): each task event PUBLISH, each ack's pipeline, each
   message a pool process publishes (a chord's body). Building one costs ~0.13 ms of
   CPU (redis-py fills a table of ~200 response callbacks), as much as sending the
   command, and a worker built five per task. A client is only a handle on the
   channel's connection pool, safe to share between threads, so one client per channel
   and pool sends the same commands on the same connections. (`orchestrator submit`
   does the same for its one channel: orchestrator.dispatch.canvas._one_producer.)

2. Task events published at most every `orch_event_flush_interval` seconds
   (ORCH_EVENT_FLUSH_INTERVAL, default 0.05; `EventBatches`). A worker already buffers
   its task events and publishes the buffer as one `task.multi` message (Flower and
   `celery events` take it apart), but on the next turn of its event loop, which came
   after nearly every event: three publishes a task (received, started, succeeded), at
   ~0.4 ms of CPU each. Waiting 50 ms puts the events of several tasks into one
   message; Flower shows a state change 50 ms later. Events still waiting when the
   consumer stops (warm shutdown, a lost broker connection) are published then.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from celery import bootsteps
from celery.signals import worker_init, worker_process_init

from . import app

log = logging.getLogger(__name__)

_CLIENT = "_orch_shared_client"  # (pool, client), in the channel's __dict__


@contextlib.contextmanager
def _conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
    """kombu's Channel.conn_or_acquire, reusing one client while the channel's pool
    stays the same (a reconnection makes a new pool: then a new client for it)."""
    if client:
        yield client
        return
    pool = self.pool
    shared = self.__dict__.get(_CLIENT)
    if shared is None or shared[0] is not pool:
        shared = (pool, self._create_client())
        self.__dict__[_CLIENT] = shared
    yield shared[1]


def share_channel_clients() -> bool:
    """Install `_conn_or_acquire` on kombu's Redis channel class, in this process (a
    worker's, before its pool forks). False (and nothing changed) if kombu's channel no
    longer looks as this was written for (kombu 5.7, pinned)."""
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if channel.conn_or_acquire is _conn_or_acquire:
        return True
    if not all(hasattr(channel, a) for a in ("conn_or_acquire", "_create_client", "pool")):
        log.warning("kombu's Redis channel changed: each command builds its own client")
        return False
    channel.conn_or_acquire = _conn_or_acquire  # type: ignore[method-assign]
    return True


@worker_init.connect
def _in_worker(**_: Any) -> None:
    share_channel_clients()


@worker_process_init.connect
def _in_pool_process(**_: Any) -> None:
    share_channel_clients()  # already there after a fork; a spawned pool process needs it


class EventBatches(bootsteps.StartStopStep):
    """Publish the consumer's buffered task events once per interval, not on every turn
    of the event loop (see the module docstring)."""

    # After Heart, so stopped before it: a stopping worker sends its last task events
    # before its worker-offline event (Flower counts a task event as a heartbeat).
    requires = ("celery.worker.consumer.events:Events", "celery.worker.consumer.heart:Heart")

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.interval = float(c.app.conf.get("orch_event_flush_interval") or 0.0)
        self.enabled = self.interval > 0
        self.consumer = c
        self.pending = False
        if self.enabled:
            # Read by the Events step when it builds the dispatcher (after every step's
            # __init__), for each buffered event.
            c.on_send_event_buffered = self.schedule

    def schedule(self) -> None:
        hub = self.consumer.hub
        if hub is None:  # no event loop: publish now (what Celery would do)
            self.consumer._flush_events()
        elif not self.pending:
            self.pending = True
            hub.call_later(self.interval, self.flush)

    def flush(self) -> None:
        self.pending = False
        self.consumer._flush_events()

    def start(self, c: Any) -> None:
        self.pending = False  # a restarted consumer may have a fresh timer

    def stop(self, c: Any) -> None:
        if self.pending:
            self.flush()

    def shutdown(self, c: Any) -> None:
        self.stop(c)


app.steps["consumer"].add(EventBatches)
