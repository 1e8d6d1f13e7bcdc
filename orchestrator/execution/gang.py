"""Data-parallel gangs: one run, N rank tasks on N distinct workers (docs/data-parallel.md).

The run's own message (train_run, one count in its chord) reaches a worker: that
attempt becomes rank 0, the leader. It holds the run's lease as every run does, then:

1. **Reserve, all or nothing.** One Lua script takes the slot of its own worker and of
   N-1 other free workers that can take ranks (`orch:slot:<worker>`), or none at all;
   a gang that cannot fill holds nothing and tries again later (RetryLater), saying why
   in `orch:gang:<run_key>`. So two gangs can never each hold part of what the other
   needs (two 2-rank jobs on 3 slots: one reserves two, the other holds none). A worker
   whose rank was lost is passed over until its registry heartbeat is newer than the
   loss (a host cut off stays registered for three heartbeats).
2. **Send the ranks.** Rank r's task goes to `rank.<worker>`, the queue only that worker
   takes, first. Ranks are numbered at the rendezvous: 0 the leader, 1..N-1 in the
   order the slots were taken.
3. **Join, bounded.** Every rank holds a lease (`orch:rank:<run_key>:<attempt>:<r>`,
   renewed by a heartbeat thread, with its step) and adds itself to the attempt's join
   set; nothing trains until all N have joined (the seed's CanStartTraining). After
   ORCH_GANG_JOIN_SECONDS without them, the attempt ends, its slots are released and
   the run is tried again later.
4. **Meet.** torch.distributed over a Redis store under a fresh prefix per attempt
   (orchestrator.execution.store), with a short collective timeout.
5. **Watch.** Each rank's heartbeat also checks its peers' leases and the gang record:
   a lapsed peer (killed, paused, cut off), or a newer attempt of the run (fencing),
   marks the gang aborted and stops this rank at its next report, or at the collective
   timeout if it is blocked in one. A rank that could not renew its own lease for a
   whole lease (cut off from Redis) stops too. The leader's failure then counts as one of the
   run's `retries`; the relaunch resumes from the last checkpoint.

Nothing here knows Celery: the leader sends rank tasks through a function it is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import keys, settings
from ..cluster.registry import list_workers
from ..experiment.spec import RunSpec

log = logging.getLogger(__name__)

JOIN_POLL_SECONDS = 0.05
SLOT_TTL_FLOOR_MS = 60_000  # a reservation whose ranks never arrive lapses by itself
GANG_TTL_SECONDS = 7 * 24 * 3600
NOT_ADMITTED = "not admitted:"  # how a rank's refusal (GPU admission) starts in the gang's abort
LOST_TTL_SECONDS = 600  # a lost rank's worker is passed over until it beats again, at most this long

# KEYS: slot keys of the leader's worker, then of every candidate; ARGV: holder, n, ttl
# ms. The leader's slot must be free (or its own); then n-1 free candidates; all or none.
_RESERVE = """
local holder, n, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local picked = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v == false or v == holder then
    table.insert(picked, i)
    if #picked == n then break end
  elseif i == 1 then
    return {-1, v}
  end
end
if #picked < n then return {0, #picked} end
for _, i in ipairs(picked) do redis.call('SET', KEYS[i], holder, 'PX', ttl) end
table.insert(picked, 1, 1)
return picked
"""

# KEYS: slots to release; ARGV: holder. Only this gang's reservations go.
_RELEASE = """
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k); n = n + 1 end
end
return n
"""

# A rank's heartbeat, one round trip. KEYS: gang hash, own rank lease, own slot, then
# the peers' rank leases. ARGV: attempt, ttl ms, own record (JSON), holder, check peers.
# Returns {'fenced'|'abort', why} or {'ok', missing peer index...}.
_BEAT = """
local g = redis.call('HMGET', KEYS[1], 'attempt', 'abort')
if tonumber(g[1]) ~= tonumber(ARGV[1]) then
  return {'fenced', 'attempt ' .. tostring(g[1]) .. ' of the run has replaced attempt ' .. ARGV[1]}
end
if g[2] then return {'abort', g[2]} end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
local out = {'ok'}
if ARGV[5] == '1' then
  for i = 4, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then table.insert(out, tostring(i - 4)) end
  end
end
return out
"""

# KEYS: gang hash; ARGV: attempt, why. Marks this attempt aborted (the first reason wins).
_ABORT = """
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) == tonumber(ARGV[1]) then
  redis.call('HSETNX', KEYS[1], 'abort', ARGV[2])
  return 1
end
return 0
"""


class GangNotReady(Exception):
    """The gang could not reserve its workers, or its ranks did not all join in time:
    nothing trained; the run is tried again later."""


class GangLost(Exception):
    """A rank of a training gang was lost (killed, paused, cut off) or the gang was
    fenced: this attempt stops; the run relaunches from its last checkpoint."""


@dataclass(frozen=True)
class DistInfo:
    """What a rank trains with (TrainContext.dist): torch.distributed is initialised."""

    rank: int
    world: int
    backend: str
    checkpoint_every: int
    load: Callable[[], bytes | None]  # rank 0: the last checkpoint, if any
    save: Callable[[bytes], None]  # rank 0: atomic, only while the attempt holds the run


def backend_for(requested: str, device: str) -> str:
    """auto: nccl on GPUs, gloo on CPUs."""
    return requested if requested != "auto" else ("nccl" if device == "cuda" else "gloo")


def holder_of(run_key: str, attempt: int) -> str:
    return f"{run_key}:{attempt}"


class Gang:
    """The Redis side of one attempt's gang (reservation, leases, join, abort)."""

    def __init__(self, client: Any, run: RunSpec, attempt: int):
        self.client, self.run, self.attempt = client, run, attempt
        self.world = run.resources.ranks
        self.holder = holder_of(run.run_key, attempt)
        self.key = keys.gang(run.run_key)
        self.prefix = keys.ddp_prefix(run.run_key, attempt)
        self.joined_key = self.prefix + "joined"
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._beat = client.register_script(_BEAT)
        self._abort = client.register_script(_ABORT)

    # --- the leader ----------------------------------------------------------------
    def candidates(self, leader: str, device: str) -> list[str]:
        """Workers that can take a rank: registered, consuming their rank queue, training
        on the same device as the leader, not holding a run now. Same host first."""
        busy = set()
        for raw in self.client.hvals(keys.ACTIVE):
            with contextlib.suppress(ValueError, TypeError):
                busy.add(json.loads(raw).get("worker"))
        records = list_workers(self.client)
        me = next((r for r in records if r.name == leader), None)
        here = me.host if me else None
        found = [r for r in records
                 if r.name != leader and keys.rank_queue(r.name) in r.queues and r.device == device
                 and r.name not in busy]
        lost = self.client.mget([lost_key(r.name) for r in found]) if found else []
        found = [r for r, at in zip(found, lost, strict=True) if not _lost_since(at, r.heartbeat)]
        found.sort(key=lambda r: (r.host != here, r.name))
        return [r.name for r in found]

    def reserve(self, leader: str, device: str) -> list[str]:
        """The gang's workers, rank 0 (the leader) first, all reserved; or GangNotReady
        (nothing held) saying why."""
        others = self.candidates(leader, device)
        registered = [r.name for r in list_workers(self.client)
                      if r.name != leader and keys.rank_queue(r.name) in r.queues and r.device == device]
        if len(registered) + 1 < self.world:
            raise self.waiting(f"needs {self.world} workers that take ranks ({device}), "
                               f"{len(registered) + 1} registered")
        ttl = max(SLOT_TTL_FLOOR_MS, int(join_seconds() * 2000))
        names = [leader, *others]
        got = self._reserve(keys=[keys.slot(n) for n in names], args=[self.holder, self.world, ttl])
        if int(got[0]) == -1:
            raise self.waiting(f"this worker is reserved by another gang ({_text(got[1])})")
        if int(got[0]) == 0:
            raise self.waiting(f"needs {self.world} free workers at once, {int(got[1])} free "
                               f"({len(registered) + 1} registered)")
        workers = [names[int(i) - 1] for i in got[1:]]
        self.client.hset(self.key, mapping={
            "attempt": self.attempt, "world": self.world, "state": "joining", "why": "",
            "workers": json.dumps(workers), "since": time.time()})
        self.client.hdel(self.key, "abort")
        self.client.expire(self.key, GANG_TTL_SECONDS)
        return workers

    def waiting(self, why: str) -> GangNotReady:
        """Recorded for `status` (no attempt field changes: an older gang stays fenced)."""
        with contextlib.suppress(Exception):
            self.client.hset(self.key, mapping={"state": "waiting", "why": why, "since": time.time()})
            self.client.expire(self.key, GANG_TTL_SECONDS)
        return GangNotReady(why)

    def release(self, workers: list[str]) -> None:
        self._release(keys=[keys.slot(w) for w in workers], args=[self.holder])

    def set_state(self, state: str) -> None:
        with contextlib.suppress(Exception):
            self.client.hset(self.key, "state", state)

    # --- every rank ------------------------------------------------------------------
    def abort(self, why: str) -> None:
        with contextlib.suppress(Exception):
            self._abort(keys=[self.key], args=[self.attempt, why])

    def refuse(self, rank: int, worker: str, why: str) -> None:
        """Rank `rank` was not admitted to `worker`'s GPU: the attempt ends before training
        (its leader raises GangNotReady: tried again later, not a failure), and `worker` is
        passed over until its next registry heartbeat."""
        with contextlib.suppress(Exception):
            self._abort(keys=[self.key], args=[self.attempt, f"{NOT_ADMITTED} rank {rank} {why}"])
            self.client.set(lost_key(worker), repr(time.time()), ex=LOST_TTL_SECONDS)

    def mark_lost(self, ranks: list[int]) -> None:
        """The workers of ranks whose lease lapsed are passed over by reservations until
        their registry heartbeat is newer than the loss: a host cut off stays registered
        for up to three heartbeats, and a gang that reserved it would wait for the join
        bound (ORCH_GANG_JOIN_SECONDS) for a rank that never comes."""
        with contextlib.suppress(Exception):
            workers = json.loads(self.client.hget(self.key, "workers") or "[]")
            now = time.time()
            for r in ranks:
                if 0 <= r < len(workers) and isinstance(workers[r], str):
                    self.client.set(lost_key(workers[r]), repr(now), ex=LOST_TTL_SECONDS)

    def beat(self, rank: int, worker: str, record: dict[str, Any], peers: bool) -> tuple[str, str]:
        """Renew this rank's lease and slot; ('ok', '') or (what, why) it must stop."""
        others = [keys.rank(self.run.run_key, self.attempt, r) for r in range(self.world) if r != rank]
        names = [r for r in range(self.world) if r != rank]
        reply = self._beat(keys=[self.key, keys.rank(self.run.run_key, self.attempt, rank), keys.slot(worker),
                                 *others],
                           args=[self.attempt, lease_ms(), json.dumps(record), self.holder, "1" if peers else "0"])
        what = _text(reply[0])
        if what != "ok":
            return what, _text(reply[1])
        if missing := [names[int(_text(i))] for i in reply[1:]]:
            self.mark_lost(missing)
            return "lost", f"rank {', '.join(map(str, missing))} lost its lease (killed, paused or cut off)"
        return "ok", ""

    def join(self, rank: int) -> None:
        self.client.sadd(self.joined_key, rank)
        self.client.expire(self.joined_key, GANG_TTL_SECONDS)

    def joined(self) -> int:
        return int(self.client.scard(self.joined_key))

    def end_rank(self, rank: int, worker: str) -> None:
        with contextlib.suppress(Exception):
            self.client.delete(keys.rank(self.run.run_key, self.attempt, rank))
            self.release([worker])


def lost_key(worker: str) -> str:
    """When a rank of `worker` was last lost (Gang.mark_lost)."""
    return f"{keys.PREFIX}:gang-lost:{worker}"


def _lost_since(at: Any, heartbeat: float) -> bool:
    """Lost at `at` (unix time, as stored) and not heard of since."""
    try:
        return at is not None and float(_text(at)) >= heartbeat
    except ValueError:
        return False


def join_seconds() -> float:
    return float(settings.value("ORCH_GANG_JOIN_SECONDS"))


def retry_seconds() -> float:
    return float(settings.value("ORCH_GANG_RETRY_SECONDS"))


def lease_ms() -> int:
    return int(float(settings.value("ORCH_GANG_LEASE_SECONDS")) * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RankWatch:
    """One rank's heartbeat thread: renews its lease and slot every fifth of the lease,
    checks its peers once all have joined, and records why the rank must stop."""

    def __init__(self, gang: Gang, rank: int, worker: str, host: str, gpu: str | None):
        self.gang, self.rank, self.worker = gang, rank, worker
        self.record: dict[str, Any] = {"rank": rank, "world": gang.world, "name": gang.run.name,
                                       "worker": worker, "host": host, "gpu": gpu,
                                       "pid": os.getpid(), "attempt": gang.attempt, "step": None,
                                       "started": time.time()}
        self.stop_why: str | None = None
        self.all_joined = False
        self.renewed = time.monotonic()  # the last beat that reached Redis
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rank{rank}-watch", daemon=True)

    def start(self) -> RankWatch:
        self.beat()
        if self.stop_why is None:
            self._thread.start()
        return self

    def beat(self) -> None:
        self.record["beat"] = time.time()
        try:
            what, why = self.gang.beat(self.rank, self.worker, self.record, self.all_joined)
        except Exception as exc:  # Redis unreachable: the lease lapses, the peers stop
            log.warning("rank %d heartbeat failed: %s", self.rank, exc)
            # Unrenewed for a whole lease, this rank's lease is gone: its peers abort the
            # attempt (they see it lost), so it stops too, without hearing so (cut off).
            if (silent := time.monotonic() - self.renewed) > lease_ms() / 1000 and self.stop_why is None:
                self.stop_why = f"cut off from Redis for {silent:.0f} s: its rank lease lapsed"
                log.warning("rank %d of %s stops: %s", self.rank, self.gang.run.name, self.stop_why)
            return
        self.renewed = time.monotonic()
        if what != "ok" and self.stop_why is None:
            self.stop_why = why
            if what == "lost":
                self.gang.abort(why)
            log.warning("rank %d of %s stops: %s", self.rank, self.gang.run.name, why)

    def _loop(self) -> None:
        interval = lease_ms() / 5000
        while not self._done.wait(interval):
            self.beat()

    def step(self, value: Any) -> None:
        self.record["step"] = value

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.gang.end_rank(self.rank, self.worker)

    def wait_all(self) -> None:
        """The barrier: every rank joined, or GangNotReady after ORCH_GANG_JOIN_SECONDS,
        or GangLost when the gang was aborted or fenced meanwhile."""
        self.gang.join(self.rank)
        deadline = time.monotonic() + join_seconds()
        while (n := self.gang.joined()) < self.gang.world:
            if self.stop_why is not None and self.stop_why.startswith(NOT_ADMITTED):
                raise self.gang.waiting(self.stop_why)  # nothing trained: tried again later
            if self.stop_why is not None:
                raise GangLost(self.stop_why)
            if time.monotonic() > deadline:
                raise GangNotReady(f"only {n} of {self.gang.world} ranks joined within {join_seconds():g} s")
            time.sleep(JOIN_POLL_SECONDS)
        self.all_joined = True


@contextlib.contextmanager
def process_group(gang: Gang, rank: int, backend: str) -> Iterator[None]:
    """torch.distributed initialised over the attempt's Redis store, with a short
    collective timeout (ORCH_GANG_COLLECTIVE_TIMEOUT), destroyed at the end."""
    from datetime import timedelta

    import torch.distributed as dist

    from .store import RedisStore, route_interface

    # Across hosts, the ranks meet on the interface their host reaches Redis through,
    # unless the operator named one (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
    variable = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    if variable not in os.environ and (found := route_interface(gang.client)) is not None:
        os.environ[variable] = found[0]
        log.info("%s rank %d: %s over %s (%s, the address this host reaches Redis from)",
                 gang.run.name, rank, backend, *found)
    timeout = float(settings.value("ORCH_GANG_COLLECTIVE_TIMEOUT"))
    store = RedisStore(gang.client, gang.prefix + "s/", timeout=max(timeout, join_seconds()))
    dist.init_process_group(backend, store=store, rank=rank, world_size=gang.world,
                            timeout=timedelta(seconds=timeout))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def checkpoint_io(path: Path | None, check: Callable[[], None]) -> tuple[Callable[[], bytes | None],
                                                                         Callable[[bytes], None]]:
    """(load, save) of a checkpoint file: save checks the fence, then writes atomically."""
    from ..paths import atomic_write_bytes

    def load() -> bytes | None:
        if path is None or not path.is_file():
            return None
        return path.read_bytes()

    def save(data: bytes) -> None:
        if path is None:
            return
        check()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    return load, save


def checkpoint_every() -> int:
    return int(settings.value("ORCH_CHECKPOINT_EVERY"))


def gang_views(client: Any, run_keys: list[str]) -> dict[str, dict[str, Any]]:
    """For `status` and `watch`: each data-parallel run's gang (state, attempt, why it
    waits) and the ranks of its current attempt (worker, host, GPU, step, last beat).
    Two round trips, whatever the number of runs."""
    pipe = client.pipeline(transaction=False)
    for key in run_keys:
        pipe.hgetall(keys.gang(key))
    out: dict[str, dict[str, Any]] = {}
    for key, raw in zip(run_keys, pipe.execute(), strict=True):
        if not raw:
            continue
        g = {_text(k): _text(v) for k, v in raw.items()}
        with contextlib.suppress(ValueError):
            attempt, world = int(g.get("attempt") or 0), int(g.get("world") or 0)
            out[key] = {"state": g.get("state"), "attempt": attempt or None, "world": world or None,
                        "why": g.get("why") or None, "abort": g.get("abort"), "ranks": []}
    pipe = client.pipeline(transaction=False)
    asked = [key for key, v in out.items() if v["attempt"] and v["world"]]
    for key in asked:
        pipe.mget([keys.rank(key, out[key]["attempt"], r) for r in range(min(out[key]["world"], 1024))])
    for key, values in zip(asked, pipe.execute() if asked else [], strict=True):
        for value in values:
            with contextlib.suppress(ValueError, TypeError):
                if isinstance(rec := json.loads(value), dict):
                    out[key]["ranks"].append(rec)
    return out
