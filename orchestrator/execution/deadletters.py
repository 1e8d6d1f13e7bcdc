"""The dead letters: messages from the broker that a worker refused, with the reason.

A refused message is recorded here once and never delivered again: by the broker edge
(tasks.edge: a message that cannot be decoded, is too large or too deeply nested, has
the wrong shape, names a task that is not this project's or comes from a queue its task
may not come from) and by the tasks themselves (a run spec that does not validate, a
trainer that is not registered). `orchestrator deadletters` lists and purges them.

One Redis list, `orch:deadletters`, newest first, bounded to the last MAX_ENTRIES: a
flood of hostile messages cannot fill Redis (it runs with `noeviction`, where a full
Redis refuses every write, leases and chords included). Each entry is a JSON object:
`time` (unix seconds), `reason`, `task_id`, `task`, `queue`, `host` (who refused it),
`size` (bytes of the raw message) and `raw` (its start, at most RAW_PREFIX characters).

What is recorded is hostile by assumption: `add` takes anything (any type, any size,
bytes that are not UTF-8, lone surrogates) and never raises for its content; only an
unreachable Redis raises (redis.RedisError), for the caller to log.
"""

from __future__ import annotations

import builtins
import json
import socket
import time
from typing import Any, cast

import redis

from ..keys import DEADLETTERS as KEY
from ..keys import client as redis_client

MAX_ENTRIES = 10_000  # the newest are kept; older ones are dropped at each add
RAW_PREFIX = 4096  # characters of the raw message kept (its first bytes)
TEXT_MAX = 1000  # characters of the reason; ids and names get FIELD_MAX
FIELD_MAX = 200


def _text(value: Any, limit: int) -> str | None:
    """A bounded, printable text of `value` (None stays None)."""
    if value is None:
        return None
    try:
        text = value if isinstance(value, str) else repr(value)
    except Exception:  # a hostile __repr__ cannot stop a refusal being recorded
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    # Lone surrogates (from a JSON "\ud800") cannot be encoded for Redis: escape them.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw(raw: Any) -> tuple[str | None, int | None]:
    """The start of a raw message as text (at most RAW_PREFIX characters; bytes that are
    not UTF-8 as \\xNN escapes), and its full size (bytes, or characters of a text)."""
    if raw is None:
        return None, None
    if isinstance(raw, bytes | bytearray | memoryview):
        size, text = len(raw), bytes(raw[:RAW_PREFIX]).decode("utf-8", "backslashreplace")
    else:
        text = raw if isinstance(raw, str) else _text(raw, RAW_PREFIX) or ""
        size, text = len(text), text[:RAW_PREFIX]
    # Lone surrogates (from a JSON "\ud800") cannot be encoded for Redis: escape them.
    return text[:RAW_PREFIX].encode("utf-8", "backslashreplace").decode("utf-8"), size


class DeadLetters:
    """The dead-letter list in one Redis (the live-state Redis: ORCH_STATE_URL)."""

    def __init__(self, client: redis.Redis):
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> DeadLetters:
        # Short timeouts ("command"): a refusal is recorded from a worker's event loop,
        # which must not hang on a Redis that does not answer (the refusal is logged then).
        return cls(redis_client(url, "command"))

    def add(self, reason: str, *, task_id: str | None = None, task: str | None = None,
            queue: str | None = None, raw: bytes | str | None = None) -> None:
        """Record one refused message (newest first, the list trimmed to MAX_ENTRIES)."""
        text, size = _raw(raw)
        entry = {"time": time.time(), "reason": _text(reason, TEXT_MAX) or "(no reason given)",
                 "task_id": _text(task_id, FIELD_MAX), "task": _text(task, FIELD_MAX),
                 "queue": _text(queue, FIELD_MAX), "host": socket.gethostname(), "size": size,
                 "raw": text}
        with self.client.pipeline(transaction=False) as pipe:
            pipe.lpush(KEY, json.dumps(entry))
            pipe.ltrim(KEY, 0, MAX_ENTRIES - 1)
            pipe.execute()

    def list(self, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The newest `limit` entries, newest first. An entry that is not one of ours
        (anyone who can write to Redis can push to the list) is shown as unreadable."""
        if limit <= 0:
            return []
        entries = []
        for item in cast(builtins.list[bytes], self.client.lrange(KEY, 0, limit - 1)):
            try:
                entry = json.loads(item)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except (ValueError, TypeError, RecursionError):
                entry = {"time": None, "reason": "unreadable dead-letter entry", "raw": _raw(item)[0]}
            entries.append(entry)
        return entries

    def count(self) -> int:
        return int(cast(int, self.client.llen(KEY)))

    def purge(self) -> int:
        """Remove every entry; returns how many there were."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.llen(KEY)
            pipe.delete(KEY)
            n, _ = pipe.execute()
        return int(n)
