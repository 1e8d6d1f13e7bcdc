"""Handing a message on in kombu's Redis transport, for the watchdog
(orchestrator.cluster.watchdog decides; these move messages): a lost attempt's message
back at the head of its queue under a new delivery tag, orphaned deliveries found, and
whether anything of an experiment is queued or unacknowledged (cluster.stall).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from . import app
from .edge import TAKER


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
        payload["properties"].pop(TAKER, None)  # the next taker stamps its own
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


def restore_orphans(known_task_ids: set[str], orphaned: Any) -> list[str]:
    """Unacknowledged training (and role) messages that no attempt holds a lease for (nor waits on)
    and that `orphaned(age, taker)` (cluster.watchdog.OrphanRule) finds lost: their
    worker died or lost them before it started (a kill between fetch and start, a
    connection cut, a Redis restart while the restore at disconnect could not reach
    it). Without this they would wait for the visibility timeout (hours). Each is put
    back at the head of its queue; returns their names."""
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
                taker = payload["properties"].get(TAKER)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
            if task not in ("tasks.train_run", "tasks.role_run") or task_id in known_task_ids:
                continue
            if not orphaned(now - float(delivered.get(tag, now)), taker):
                continue
            # At the head, as restore_message does: it was taken before what is queued now.
            if hand_on(channel, tag.decode() if isinstance(tag, bytes) else tag):
                restored.append(str(headers.get("argsrepr") or task_id))
    return restored


def in_flight() -> set[str] | None:
    """None while any message waits in a list of the broker (a queue, a parked queue);
    else the experiments that have an unacknowledged message (a run delivered or
    waiting for its retry, a finalize running)."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        for key in client.scan_iter(count=5000, _type="list"):
            if not key.startswith((b"orch:", b"celery-")):  # the project's own lists, chord joins
                return None
        found: set[str] = set()
        for raw in client.hgetall(conn.default_channel.unacked_key).values():  # (HGETALL: the control user may not HVALS)
            try:
                found.add(_experiment(json.loads(raw)[0]))
            except Exception:  # not ours to judge: then nothing counts as stalled
                return None
    return found


def _experiment(payload: dict[str, Any]) -> str:
    """The experiment of a delivered message of this project's tasks (KeyError else)."""
    task = payload["headers"]["task"]
    args, kwargs = json.loads(base64.b64decode(payload["body"]))[:2]
    if task == "tasks.train_run":
        spec = args[0]
    elif task == "tasks.finalize":  # (results, [spec]) from its chord or a finalize-only send
        spec = args[1][0]
    elif task == "tasks.group_failed":  # (failed task id), specs=[spec]
        spec = kwargs["specs"][0]
    elif task == "tasks.role_run":  # a role instance (orchestrator.roles), spec=RoleSpec
        spec = kwargs["spec"]
    else:
        raise KeyError(task)
    return str(spec["experiment"])
