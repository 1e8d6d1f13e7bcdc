"""Worker-side reliability hooks, connected through Celery signals:

- In every worker that consumes `control`: the watchdog thread (orchestrator.cluster.watchdog),
  with kombu's own restore of an unacknowledged message as the way to hand a run back.
- In every worker: on shutdown, the runs it holds are handed back at once (their
  leases revoked as "handed back"), so a warm stop does not wait for a lease to lapse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from . import app

log = logging.getLogger(__name__)
_stop = threading.Event()


def hand_on(channel: Any, tag: str) -> bool:
    """Put an unacknowledged message back at the head of its queue, as kombu's restore
    does (same message, same task id, so the chord counts it once; marked redelivered),
    but under a new delivery tag. kombu would restore it with the old tag, which the
    next delivery then shares with the lost one: a zombie coming back would ack or
    requeue its successor's delivery with its own. The head: the end consumers take
    next (kombu publishes with LPUSH and consumes with BRPOP), so the run starts on the
    next free slot, before every run queued after it. False if it was not unacknowledged."""
    found = []

    def move(pipe: Any) -> None:
        raw = pipe.hget(channel.unacked_key, tag)
        pipe.multi()
        pipe.hdel(channel.unacked_key, tag)
        pipe.zrem(channel.unacked_index_key, tag)
        if not raw:
            return
        payload, exchange, routing_key = json.loads(raw)
        payload["properties"]["delivery_tag"] = str(uuid.uuid4())
        payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
        payload["headers"]["redelivered"] = True
        priority = channel._get_message_priority(payload, reverse=False)
        for queue in channel._lookup(exchange, routing_key):
            pipe.rpush(channel._q_for_pri(queue, priority), json.dumps(payload))
        found.append(tag)

    channel.client.transaction(move, channel.unacked_key)
    return bool(found)


def restore_message(task_id: str) -> bool:
    """Hand the unacknowledged message of `task_id` on (`hand_on`). False if no such
    message is unacknowledged."""
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            try:
                payload = json.loads(raw)[0]
                found = payload["headers"]["id"] == task_id
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            if found:
                return hand_on(channel, tag.decode() if isinstance(tag, bytes) else tag)
    return False


def restore_orphans(known_task_ids: set[str], older_than: float) -> list[str]:
    """Unacknowledged training messages that no attempt holds a lease for (nor waits on),
    delivered more than `older_than` seconds ago: their worker lost them before it
    started (a connection cut between fetch and start, a Redis restart while the
    restore at disconnect could not reach it). Without this they would wait for the
    visibility timeout (hours). Each is put back on its queue; returns their names."""
    restored = []
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        now = time.time()
        delivered = dict(client.zrange(channel.unacked_index_key, 0, -1, withscores=True))
        for tag, raw in client.hgetall(channel.unacked_key).items():
            try:
                payload = json.loads(raw)[0]
                headers = payload["headers"]
                task_id, task = headers["id"], headers["task"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            if task != "tasks.train_run" or task_id in known_task_ids:
                continue
            if now - float(delivered.get(tag, now)) < older_than:
                continue
            # At the head, as restore_message does: it was taken before what is queued now.
            if hand_on(channel, tag.decode() if isinstance(tag, bytes) else tag):
                restored.append(str(headers.get("argsrepr") or task_id))
    return restored


def unpark_unpaused() -> list[str]:
    """Parked queues of experiments that are no longer paused (a run parked in the
    moment `resume` ran): move them back. The watchdog calls this every tick."""
    from orchestrator.dispatch.canvas import unpark
    from orchestrator.execution.leases import Leases

    done: list[str] = []
    with app.connection_for_write() as conn:
        # The whole keyspace is walked every tick (results, logs, attempts: thousands of
        # keys): in big steps, not SCAN's default 10 keys a round trip.
        names = {k.decode().split(":")[0][len("parked."):]
                 for k in conn.default_channel.client.scan_iter("parked.*", count=5000)}
    if not names:
        return done
    leases = Leases.from_url(app.conf.orch_state_url)
    for name in sorted(names):
        if name and not leases.paused(name) and (moved := unpark(name)):
            done.append(f"{name}: {len(moved)} parked runs back on their queues (not paused)")
    return done


def _leases() -> Any:
    from orchestrator.execution.leases import Leases

    return Leases.from_url(app.conf.orch_state_url)


def _redispatch() -> dict[str, int]:
    from orchestrator.dispatch.canvas import redispatch
    from orchestrator.livestate import LiveState
    from orchestrator.paths import Layout

    return redispatch(Layout(app.conf.orch_results_root), LiveState.from_url(app.conf.orch_state_url))


@worker_ready.connect
def _start_watchdog(sender: Any = None, **_: Any) -> None:
    queues = set(app.amqp.queues.consume_from or {})
    if "control" not in queues:
        return
    from orchestrator.cluster.watchdog import Watchdog

    from .search import advance_searches

    dog = Watchdog(_leases(), restore_message, _redispatch, orphans=restore_orphans,
                   chores=[unpark_unpaused, advance_searches],
                   name=f"watchdog@{getattr(sender, 'hostname', '?')}")
    _stop.clear()
    threading.Thread(target=dog.run_forever, args=(_stop,), name="orch-watchdog", daemon=True).start()
    log.info("watchdog started (every %.1f s, leases of %.1f s)", dog.interval, dog.leases.ttl)


@worker_shutting_down.connect
def _hand_back(sender: Any = None, how: str = "", **_: Any) -> None:
    """This worker stops cold (SIGTERM of `orchestrator worker`, SIGQUIT): revoke the
    leases it holds as "handed back". Its pool child is then stopped by Celery and its
    unacknowledged message goes back to the queue (or the child, if it gets there first,
    requeues it itself); the next worker claims the run at once instead of waiting for
    the lease to lapse. A warm stop (SIGINT, `workers down --drain`) lets runs finish."""
    _stop.set()
    if how != "Cold":
        return
    hostname = str(sender or "")
    with contextlib.suppress(Exception):
        leases = _leases()
        for run_id, entry in leases.active().items():
            if entry.get("worker") == hostname and entry.get("token"):
                leases.revoke(run_id, entry["token"], why="handed back")
                log.warning("handed back %s (worker stopping)", entry.get("name", run_id))
