"""Versioned weights in Redis: chunked, checksummed, published by flipping a pointer last.

Why not `SET weights` + `PUBLISH`: Redis caps a value at 512 MB, and drops a pub/sub
subscriber that falls 32 MB behind, so a big model cannot be one value and a message is
not a delivery. Here (keys: orchestrator.roles.rkeys):

1. A publish takes a fresh version number (INCR: never reused, also by a zombie),
   writes the payload as chunks of `chunk_bytes` under that version, each with a TTL
   (pipelined, memoryview slices: no copy of the payload), and a checksum per chunk.
2. One Lua script then checks that the publisher's lease key still holds its token
   (orchestrator.execution.leases: the learner's fencing token) and that the version is
   newer than the pointer; persists the chunks, writes the version's meta (size,
   chunk checksums, the version's checksum, step), acknowledges the experience the
   version was trained on (optional), and sets the pointer LAST. A zombie learner fails
   the token check: nothing of its version becomes visible, its chunks expire.
3. Readers read the pointer, then the version's meta and chunks. Chunks of a version
   never change once written, so a read is never torn; a version pruned while it was
   read (its chunks gone) is retried at the new pointer; every read is verified against
   the checksums. A `ready` message on pub/sub is only a hint: readers poll as well.
4. After a flip, versions beyond the last `keep` are deleted, except the best one
   (`mark_best`, from the evaluators) and the versions no evaluator has scored yet: with
   `unscored` > 0 (the experiment has evaluators) the flip also pins the version (zset
   `unscored`), the evaluator that scores it releases the pin (orchestrator.roles.
   evaluation), and the learner publishes only while fewer than `unscored` versions are
   pinned (`room_for_one`; RoleContext.publish waits). So Redis holds at most
   keep + 1 + unscored versions, and every version lives until it is scored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import redis

from ..outage import wait_for_redis
from . import rkeys, wire

MiB = 1 << 20
DEFAULT_CHUNK = 8 * MiB
# Versions up to this size are returned as bytes (one copy); bigger ones as the bytearray
# they were read into (no copy of hundreds of MB).
STAGE_COPY_MAX = 16 * MiB
STAGE_TTL_S = 600  # chunks of a version that was never flipped (a zombie's, a crash) expire
UNDO_WAIT_S = 60.0  # a flip without an answer: how long to wait for Redis to ask it
CHECKSUM = "sha256"

# KEYS[1] lease of the publisher, KEYS[2] ptr, KEYS[3] versions zset, KEYS[4] meta of the
# version, KEYS[5] the experience stream (or an unused key), KEYS[6] the unscored zset,
# KEYS[7] the set of every version that became current (never pruned: a publisher whose
# flip got no answer asks it), KEYS[8..] the chunk keys.
# ARGV[1] token, ARGV[2] version, ARGV[3] meta JSON, ARGV[4] ready channel, ARGV[5] the
# consumer group ('' : no acks), ARGV[6] '1': pin the version until an evaluator scores
# it, ARGV[7..] the stream ids to acknowledge.
# Returns 1 published; 0 fenced (the lease is not the token's); -1 not newer than the
# pointer; -2 a chunk is missing (expired while staged).
_FLIP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) <= cur then return -1 end
for i = 8, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -2 end
end
for i = 8, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('SADD', KEYS[7], ARGV[2])
redis.call('SET', KEYS[4], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[2])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[6], ARGV[2], ARGV[2]) end
if ARGV[5] ~= '' and #ARGV > 6 then
  redis.call('XACK', KEYS[5], ARGV[5], unpack(ARGV, 7))
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""

# KEYS[1] best; ARGV[1] version, ARGV[2] score. The best version is replaced only by a
# better score (ties keep the older one).
_BEST = """
local b = redis.call('GET', KEYS[1])
if b then
  local ok, p = pcall(cjson.decode, b)
  if ok and tonumber(p['score']) and tonumber(p['score']) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], cjson.encode({version = tonumber(ARGV[1]), score = tonumber(ARGV[2])}))
return 1
"""


class Fenced(Exception):
    """The publisher's lease no longer holds its token: it is a zombie; nothing was published."""


class ChecksumMismatch(Exception):
    """A version's bytes do not match its checksums (never expected: reported, not hidden)."""


@dataclass(frozen=True)
class Version:
    """One published version, read whole and verified."""

    number: int
    data: bytes | bytearray
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def _digest(chunk: memoryview | bytes) -> str:
    return hashlib.new(CHECKSUM, chunk).hexdigest()


def version_checksum(chunk_digests: Sequence[str]) -> str:
    """The checksum of a version: over its chunks' checksums, in order (chunks are
    hashed in parallel; hashlib releases the GIL on big buffers)."""
    return hashlib.new(CHECKSUM, "".join(chunk_digests).encode()).hexdigest()


class WeightStore:
    """The weight versions of one experiment, on one Redis client."""

    def __init__(self, client: redis.Redis, experiment: str, keep: int = 3,
                 chunk_bytes: int = DEFAULT_CHUNK, unscored: int = 0):
        """`unscored` > 0: the experiment has evaluators; each version published here is
        kept until one scores it, and at most `unscored` such versions wait at a time."""
        if keep < 1 or chunk_bytes < 1 or unscored < 0:
            raise ValueError("keep and chunk_bytes must be positive, unscored not negative")
        self.client, self.experiment = client, experiment
        self.keep, self.chunk_bytes, self.unscored_max = keep, chunk_bytes, unscored
        self.prefix = rkeys.weights(experiment)
        self._flip = client.register_script(_FLIP)
        self._best = client.register_script(_BEST)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="orch-weights")

    # -- keys -------------------------------------------------------------------------
    @property
    def pointer_key(self) -> str:
        return f"{self.prefix}:ptr"

    @property
    def ready_channel(self) -> str:
        return f"{self.prefix}:ready"

    @property
    def unscored_key(self) -> str:
        return f"{self.prefix}:unscored"

    @property
    def published_key(self) -> str:
        return f"{self.prefix}:published"

    def meta_key(self, version: int) -> str:
        return f"{self.prefix}:v:{version}:meta"

    def chunk_key(self, version: int, index: int) -> str:
        return f"{self.prefix}:v:{version}:c:{index}"

    # -- writing ----------------------------------------------------------------------
    def publish(self, data: bytes | bytearray | memoryview, token: str, lease_key: str,
                step: int = 0, info: dict[str, Any] | None = None,
                acks: tuple[str, str, Sequence[str]] | None = None,
                checkpoint: Callable[[int, dict[str, Any]], Callable[[], None]] | None = None) -> int:
        """Publish `data` as the next version, under the lease `lease_key` holding
        `token`; returns the version number. `acks` = (stream, group, ids): experience
        entries acknowledged in the same step (trained on by this version).
        `checkpoint(version, meta)` runs after the chunks are written and before the
        pointer flips (so every version that becomes current has its file, whenever the
        publisher dies); it returns what undoes it, called if the flip is refused. Raises
        Fenced when the lease is not the token's (nothing becomes visible)."""
        view = memoryview(data).cast("B")
        size = len(view)
        version = int(cast(int, self.client.incr(f"{self.prefix}:seq")))
        bounds = [(i, min(i + self.chunk_bytes, size)) for i in range(0, size, self.chunk_bytes)] or [(0, 0)]
        # Hash on the pool while the chunks go out on the socket (both release the GIL).
        digests = [self._pool.submit(_digest, view[a:b]) for a, b in bounds]
        chunk_keys = [self.chunk_key(version, i) for i in range(len(bounds))]
        wire.set_many(self.client, [(k, view[a:b]) for k, (a, b) in zip(chunk_keys, bounds, strict=True)],
                      STAGE_TTL_S)
        sums = [f.result() for f in digests]
        meta = {"version": version, "size": size, "chunks": len(bounds), "chunk_bytes": self.chunk_bytes,
                "algorithm": CHECKSUM, "chunk_checksums": sums, "checksum": version_checksum(sums),
                "step": int(step), "published_at": time.time(), **(info or {})}
        stream, group, ids = acks if acks is not None else ("", "", ())
        undo = checkpoint(version, meta) if checkpoint is not None else None
        try:
            code = int(cast(int, self._flip(
                keys=[lease_key, self.pointer_key, f"{self.prefix}:versions", self.meta_key(version),
                      stream or f"{self.prefix}:none", self.unscored_key, self.published_key, *chunk_keys],
                args=[token, version, json.dumps(meta), self.ready_channel, group if stream else "",
                      "1" if self.unscored_max else "0", *ids])))
        except redis.RedisError:
            # No answer (Redis restarting, this host cut off): whether the version became
            # current is known once Redis answers again. If it did not, its checkpoint
            # file goes: no file is left of a version that never became current.
            if undo is not None and wait_for_redis(self.client, UNDO_WAIT_S) and \
                    not self.client.sismember(self.published_key, str(version)):
                undo()
            raise
        if code != 1:
            self.client.delete(*chunk_keys)  # never visible: drop at once rather than expire
            if undo is not None:
                undo()
            if code == 0:
                raise Fenced(f"version {version} not published: the lease {lease_key} is not this publisher's")
            raise RuntimeError(f"version {version} not published (code {code})")
        self.prune()
        return version

    def prune(self) -> list[int]:
        """Delete versions beyond the last `keep`, except the best and those not scored
        yet (pinned at their flip); returns those deleted."""
        listed = [int(v) for v in cast(list[bytes], self.client.zrange(f"{self.prefix}:versions", 0, -1))]
        best = self.best()
        keep = set(listed[-self.keep:]) | ({best[0]} if best else set()) | set(self.unscored())
        gone = [v for v in listed if v not in keep]
        if not gone:
            return []
        metas = [self._meta(v) for v in gone]
        pipe = self.client.pipeline(transaction=False)
        for v, meta in zip(gone, metas, strict=True):
            pipe.zrem(f"{self.prefix}:versions", v)
            pipe.delete(self.meta_key(v))
            n = int(meta.get("chunks", 0)) if meta else 0
            for i in range(n):
                pipe.delete(self.chunk_key(v, i))
        pipe.execute()
        return gone

    def unscored(self) -> list[int]:
        """The versions published for evaluators and not scored yet, oldest first."""
        return [int(v) for v in cast(list[bytes], self.client.zrange(self.unscored_key, 0, -1))]

    def room_for_one(self) -> bool:
        """Whether a version may be published now: fewer than `unscored` versions wait
        for an evaluator (always, without evaluators)."""
        return not self.unscored_max or int(cast(int, self.client.zcard(self.unscored_key))) < self.unscored_max

    def mark_best(self, version: int, score: float) -> bool:
        """Keep `version` as the best (whatever `keep` says) if `score` beats the best's."""
        return bool(self._best(keys=[f"{self.prefix}:best"], args=[version, float(score)]))

    # -- reading ----------------------------------------------------------------------
    def latest(self) -> int | None:
        raw = self.client.get(self.pointer_key)
        return int(cast(bytes, raw)) if raw else None

    def best(self) -> tuple[int, float] | None:
        raw = cast(bytes | None, self.client.get(f"{self.prefix}:best"))
        if not raw:
            return None
        try:
            got = json.loads(raw)
            return int(got["version"]), float(got["score"])
        except (ValueError, KeyError, TypeError):
            return None

    def versions(self) -> list[int]:
        return [int(v) for v in cast(list[bytes], self.client.zrange(f"{self.prefix}:versions", 0, -1))]

    def _meta(self, version: int) -> dict[str, Any] | None:
        raw = cast(bytes | None, self.client.get(self.meta_key(version)))
        if not raw:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def meta(self, version: int) -> dict[str, Any] | None:
        return self._meta(version)

    def fetch(self, version: int | None = None, attempts: int = 5) -> Version | None:
        """The version `version` (default: the current one), verified; None if there is
        none (or `version` was pruned). Raises ChecksumMismatch on bad bytes."""
        for _ in range(attempts):
            number = version if version is not None else self.latest()
            if number is None:
                return None
            got = self._read(number)
            if got is not None:
                return got
            if version is not None:
                return None  # that version is gone
        return None

    def _read(self, number: int) -> Version | None:
        meta = self._meta(number)
        if meta is None:
            return None
        n, size, step = int(meta["chunks"]), int(meta["size"]), int(meta["chunk_bytes"])
        sizes = [min(step, size - i * step) for i in range(n)] if size else [0]
        hashing: dict[int, Future[str]] = {}
        buf = wire.get_into(self.client, [self.chunk_key(number, i) for i in range(n)], sizes,
                            on_chunk=lambda i, chunk: hashing.__setitem__(i, self._pool.submit(_digest, chunk)))
        sums = [hashing[i].result() for i in sorted(hashing)]  # (also when the read failed)
        if buf is None:
            return None  # pruned while we read: the caller reads the new pointer
        if sums != meta["chunk_checksums"] or version_checksum(sums) != meta["checksum"]:
            raise ChecksumMismatch(f"version {number} of {self.experiment}: checksum mismatch")
        return Version(number, bytes(buf) if size <= STAGE_COPY_MAX else buf, meta)

    def wait_newer(self, than: int | None, timeout: float, stop: Callable[[], bool] | None = None,
                   poll: float = 0.5) -> int | None:
        """The current version once it is newer than `than`, polling every `poll` s (a
        ready message on pub/sub wakes it sooner); None after `timeout` or when `stop()`."""
        deadline = time.monotonic() + timeout
        sub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            sub.subscribe(self.ready_channel)
            while True:
                now = self.latest()
                if now is not None and (than is None or now > than):
                    return now
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop()):
                    return None
                sub.get_message(timeout=min(poll, left))
        finally:
            sub.close()

    def clear(self) -> None:
        """Delete every weight key of the experiment (tests, benchmarks)."""
        for key in self.client.scan_iter(f"{self.prefix}:*", count=1000):
            self.client.delete(key)
