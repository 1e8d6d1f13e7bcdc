"""The experience stream of a roles experiment: Redis Streams with one consumer group.

- Actors add samples in batches (`add`): one Lua script adds the whole batch only if
  the stream then holds at most `maxlen` entries, else nothing (the actor waits and
  tries again). Memory is bounded by `maxlen` entries, and nothing is trimmed that the
  learner has not acknowledged: backpressure, not loss.
- The learner reads through the group `learner` (XREADGROUP) under its instance's
  consumer name, and acknowledges what it trained on when the weights trained on it are
  published (orchestrator.roles.weights: the XACK is in the same script as the pointer
  flip). After an acknowledgement the stream is trimmed (XTRIM MINID) below the oldest
  entry still pending or unread.
- A learner that restarts resumes from the last published version and first reads its
  consumer's pending entries again (XREADGROUP from id 0): exactly what it had read but
  not yet published a version of, so no acknowledged sample is lost and none is
  trained on twice by the weights that survive. Entries pending under another consumer
  name (an instance renamed) are claimed first (XAUTOCLAIM).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from . import rkeys

GROUP = "learner"

# KEYS[1] stream; ARGV[1] maxlen; ARGV[2..] the samples (JSON). All or nothing.
_ADD = """
local n = #ARGV - 1
if redis.call('XLEN', KEYS[1]) + n > tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV do redis.call('XADD', KEYS[1], '*', 'd', ARGV[i]) end
return n
"""


@dataclass(frozen=True)
class Entry:
    id: str
    sample: Any  # the decoded JSON; None when the entry's body is gone


class ExperienceStream:
    """The stream of one experiment (or any name: benchmarks), bounded to `maxlen`."""

    def __init__(self, client: redis.Redis, experiment: str, maxlen: int = 100_000):
        if maxlen < 1:
            raise ValueError("maxlen must be positive")
        self.client, self.experiment, self.maxlen = client, experiment, maxlen
        self.key = rkeys.stream(experiment)
        self._add = client.register_script(_ADD)
        self._grouped = False

    def ensure_group(self) -> None:
        if self._grouped:
            return
        try:
            self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped = True

    def add(self, samples: Sequence[Any], wait: float = 0.0, stop: Any = None) -> bool:
        """Add `samples` (JSON-able) as one batch; True once added. While the stream is
        full, retry for up to `wait` seconds (or until `stop()` is true); False if it
        never had room."""
        if len(samples) > self.maxlen:
            raise ValueError(f"a batch of {len(samples)} samples can never fit a stream of {self.maxlen}")
        if not samples:
            return True
        self.ensure_group()
        payload = [json.dumps(s, separators=(",", ":")) for s in samples]
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            if int(cast(int, self._add(keys=[self.key], args=[self.maxlen, *payload]))):
                return True
            if time.monotonic() >= deadline or (stop is not None and stop()):
                return False
            time.sleep(delay)
            delay = min(0.2, delay * 2)

    def reader(self, consumer: str) -> Reader:
        self.ensure_group()
        return Reader(self, consumer)

    def length(self) -> int:
        return int(cast(int, self.client.xlen(self.key)))

    def pending(self) -> int:
        try:
            summary = cast(dict[str, Any], self.client.xpending(self.key, GROUP))
        except redis.ResponseError:
            return 0
        return int(summary.get("pending") or 0)

    def trim(self) -> int:
        """Drop entries below the oldest one pending or not yet read; returns how many."""
        try:
            summary = cast(dict[str, Any], self.client.xpending(self.key, GROUP))
        except redis.ResponseError:
            return 0
        if int(summary.get("pending") or 0):
            low = summary["min"]
            floor = low.decode() if isinstance(low, bytes) else str(low)
        else:
            groups = cast(list[dict[str, Any]], self.client.xinfo_groups(self.key))
            last = next((g["last-delivered-id"] for g in groups
                         if g["name"] in (GROUP, GROUP.encode())), None)
            if last is None:
                return 0
            ms, seq = (last.decode() if isinstance(last, bytes) else str(last)).split("-")
            floor = f"{ms}-{int(seq) + 1}"
        return int(cast(int, self.client.execute_command("XTRIM", self.key, "MINID", floor)))

    def reset(self) -> None:
        self.client.delete(self.key)
        self._grouped = False


class Reader:
    """The learner's side: `read` returns its own pending entries first (those read but
    not acknowledged before a restart), then new ones. Every RECHECK_S it also takes
    back entries pending longer than that which it never returned itself: those a
    zombie of the same instance read after this reader had passed its history (left
    pending, they would hold the trim back until the bound stopped the actors)."""

    RECHECK_S = 5.0

    def __init__(self, stream: ExperienceStream, consumer: str):
        self.stream, self.consumer = stream, consumer
        self._history: str | None = "0"
        self.outstanding: set[str] = set()  # returned by `read`, not yet acknowledged
        self._checked = time.monotonic()
        self._claim_others()

    def _claim_others(self) -> None:
        client, key = self.stream.client, self.stream.key
        start = "0-0"
        while True:
            # (not justid: redis-py then drops the cursor)
            reply = cast(list[Any], client.xautoclaim(key, GROUP, self.consumer, min_idle_time=0,
                                                      start_id=start, count=1000))
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if start in ("0-0", "0"):
                return

    def read(self, count: int = 256, block_ms: int = 0) -> list[Entry]:
        entries = self._read(count, block_ms)
        self.outstanding.update(e.id for e in entries)
        return entries

    def _read(self, count: int, block_ms: int) -> list[Entry]:
        client, key = self.stream.client, self.stream.key
        if self._history is not None:
            reply = client.xreadgroup(GROUP, self.consumer, {key: self._history}, count=count)
            entries = _entries(reply)
            if entries:
                self._history = entries[-1].id
                return entries
            self._history = None
        if time.monotonic() - self._checked >= self.RECHECK_S:
            self._checked = time.monotonic()
            if stray := self._stray(count):
                return stray
        reply = client.xreadgroup(GROUP, self.consumer, {key: ">"}, count=count,
                                  block=block_ms or None)
        return _entries(reply)

    def _stray(self, count: int) -> list[Entry]:
        """Entries pending (under any consumer) for RECHECK_S or longer that this reader
        never returned; claimed to it."""
        client, key = self.stream.client, self.stream.key
        reply = cast(list[Any], client.xautoclaim(key, GROUP, self.consumer,
                                                  min_idle_time=int(self.RECHECK_S * 1000),
                                                  start_id="0-0", count=count))
        found = _entries([(key, reply[1])]) if len(reply) > 1 else []
        return [e for e in found if e.id not in self.outstanding]

    def acknowledged(self, ids: Sequence[str]) -> None:
        """`ids` were acknowledged (with a weight publish)."""
        self.outstanding.difference_update(ids)

    def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge `ids` outside a weight publish (benchmarks), then trim."""
        if not ids:
            return 0
        n = int(cast(int, self.stream.client.xack(self.stream.key, GROUP, *ids)))
        self.acknowledged(ids)
        self.stream.trim()
        return n


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    for _key, items in reply or []:
        for raw_id, fields in items:
            eid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            body = (fields or {}).get(b"d") if fields else None
            try:
                sample = json.loads(body) if body is not None else None
            except ValueError:
                sample = None
            out.append(Entry(eid, sample))
    return out
