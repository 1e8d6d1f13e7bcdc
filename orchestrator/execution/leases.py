"""Run leases in Redis: who is training a run right now, fenced by a token per attempt.

Keys (all under `orch:`):

(A run is keyed by RunSpec.run_key: its content and where its outputs go.)

    lease:<run_key>       the token of the attempt that holds the run; PX ttl, renewed by
                          a thread of the worker process, independent of the training loop
    active                hash run_key -> JSON of the attempt holding (or last holding) the
                          run: token, worker, host, pid, name, experiment, task id, the
                          message to re-send; removed when the attempt ends
    attempts:<run_key>    hash: n (the number of the latest attempt: the run's fencing
                          counter), lost (attempts that never ended), failed, committed
                          (commits of the run's outputs), oom
    cancel:<experiment>   unix time of the last `orchestrator cancel`

A lease that lapses while its `active` entry remains means the worker is gone (host
down, process killed, network cut, SIGSTOP): the watchdog hands the run to another
worker and revokes the token in `active`, so the old attempt (a zombie, if it comes
back) can never renew or commit: its work is discarded.

The fencing invariant: once an attempt has been superseded (its token revoked, a later
attempt claimed the run, or the run's outputs were committed), no renewal of it ever
succeeds again, whatever key expired or was released in between. Why the scheme keeps
it: every claim increments `attempts:<run_key>` field `n` and the attempt remembers its
number; `n` only grows, and the hash has no expiry while any attempt is in flight (a
claim PERSISTs it; it expires ATTEMPTS_TTL after an attempt ends). A renewal that finds
the lease key gone may take the run back (a lapse nobody acted on, or Redis restarted
without its data) only if `n` is still its own number (or the hash is gone with all of
Redis's data), nothing was committed, and `active` holds its own token or nothing: a
successor that claimed, failed or committed and released has moved `n` on, so the old
attempt is fenced for good. The commit itself is checked in the same script right
before the rename (LeaseGuard.check), and the rename cannot replace a committed
`fold_<i>/` (runner.commit_folder): the disk is the last fence, also for a zombie that
wakes after the counter expired.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis

from .. import keys, settings
from ..keys import ACTIVE, WAITING
from ..livestate import json_hash

ATTEMPTS_TTL = 7 * 24 * 3600


def lease_seconds() -> float:
    """ORCH_LEASE_SECONDS (default 10): how long a lease lives without a heartbeat.
    Reassignment takes at most this plus one watchdog interval."""
    return float(settings.value("ORCH_LEASE_SECONDS"))


# The scripts share Lua functions, so each step of an attempt is one round trip.
# claim(): KEYS[1] lease, KEYS[2] active, KEYS[3] attempts; ARGV[1] run_key, ARGV[2] token,
# ARGV[3] ttl_ms, ARGV[4] info_json, ARGV[5] attempts_ttl_s.
# Returns {code, attempts, lost, holder}: code 1 claimed; 0 held by a live lease.
# A previous attempt whose `active` entry is still there never ended: it was lost.
# An entry "handed_back" (warm stop, watchdog reassignment) was not the run's fault.
_CLAIM_FN = """
local function claim()
  local holder = redis.call('GET', KEYS[1])
  if holder then
    local a = redis.call('HGET', KEYS[2], ARGV[1])
    return {0, 0, 0, a or ''}
  end
  local prev = redis.call('HGET', KEYS[2], ARGV[1])
  local lost = 0
  if prev then
    local ok, p = pcall(cjson.decode, prev)
    if not (ok and p['handed_back']) then lost = 1 end
  end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  local n = redis.call('HINCRBY', KEYS[3], 'n', 1)
  local l = redis.call('HINCRBY', KEYS[3], 'lost', lost)
  -- The fencing counter must outlive every attempt in flight (see the module's doc).
  redis.call('PERSIST', KEYS[3])
  return {1, n, l, ''}
end
"""
_CLAIM = _CLAIM_FN + "return claim()"

# The start of an attempt: its experiment's gates, then the claim. KEYS[4] cancel,
# KEYS[5] paused, KEYS[6] waiting; ARGV[6] the message's submitted_at ('' if unknown),
# ARGV[7] task id (a claimed delivery no longer waits). Code 3: cancelled after the
# message was submitted (the cancel time is returned as the holder); 2: paused (and the
# experiment ARGV[12] is noted in the parked index KEYS[8] at time ARGV[13], so the
# watchdog finds parked queues without walking the keyspace).
# Once claimed, optionally the run's live state (KEYS[7] hash, ARGV[8] '1', ARGV[9]
# field, ARGV[10] the JSON value up to the attempt number, which the script appends
# with the closing brace, ARGV[11] ttl_s).
_BEGIN = _CLAIM_FN + """
local c = redis.call('GET', KEYS[4])
if c and (ARGV[6] == '' or (tonumber(c) or 0) > tonumber(ARGV[6])) then return {3, 0, 0, c} end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[8], ARGV[12], ARGV[13])
  return {2, 0, 0, ''}
end
local r = claim()
if r[1] == 1 then
  redis.call('HDEL', KEYS[6], ARGV[7])
  if ARGV[8] == '1' then
    redis.call('HSET', KEYS[7], ARGV[9], ARGV[10] .. r[2] .. '}')
    redis.call('EXPIRE', KEYS[7], ARGV[11])
  end
end
return r
"""

# renew(): KEYS[1] lease, KEYS[2] active, KEYS[3] attempts; ARGV[1] run_key, ARGV[2]
# token, ARGV[3] ttl_ms, ARGV[4] info_json, ARGV[5] the attempt's number. 1: renewed.
# 2: the lease had lapsed (or Redis lost it) but nothing happened since: taken back.
# 0: fenced: the token was revoked, a later attempt claimed the run (n moved on), or the
# run's outputs were committed. Never 2 after any of these (the module's invariant).
_RENEW_FN = """
local function renew()
  local cur = redis.call('GET', KEYS[1])
  if cur == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
  end
  if cur then return 0 end
  local n = redis.call('HGET', KEYS[3], 'n')
  if redis.call('HGET', KEYS[3], 'committed') then return 0 end
  if n and n ~= ARGV[5] then return 0 end
  local a = redis.call('HGET', KEYS[2], ARGV[1])
  if a then
    local ok, p = pcall(cjson.decode, a)
    if not (ok and p['token'] == ARGV[2]) then return 0 end
  else
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  end
  if not n then
    redis.call('HSET', KEYS[3], 'n', ARGV[5])
    redis.call('PERSIST', KEYS[3])
  end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
"""
# What a running attempt asks (heartbeat, and before it writes): renew, and the
# experiment's cancel time (KEYS[4]). Returns {renew code, cancel time or ''}.
_PROBE = _RENEW_FN + """
return {renew(), redis.call('GET', KEYS[4]) or ''}
"""

# An attempt whose number is not above what the run's status file records (Redis lost
# its counter, or local mode started a new Redis for a later `run`): renumber it past
# the file's, so that attempt numbers keep counting and no log is overwritten.
# KEYS[1] lease, KEYS[2] attempts; ARGV[1] token, ARGV[2] its number, ARGV[3] the new.
_RENUMBER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n = redis.call('HGET', KEYS[2], 'n')
if n and n ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'n', ARGV[3])
return 1
"""

# release(): KEYS[1] lease, KEYS[2] active; ARGV[1] run_key, ARGV[2] token. Ends an
# attempt that holds the token (1), else changes nothing (0).
_RELEASE_FN = """
local function release()
  if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
  local a = redis.call('HGET', KEYS[2], ARGV[1])
  if a then
    local ok, p = pcall(cjson.decode, a)
    if ok and p['token'] == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[1]) return 1 end
  end
  return 0
end
"""
_RELEASE = _RELEASE_FN + "return release()"

# The end of an attempt: release; count the commit (KEYS[3] attempts, ARGV[3] '1',
# ARGV[4] attempts_ttl_s); drop its progress (KEYS[4], field run_key) if it still held
# the run; keep its log tail (KEYS[5], ARGV[5] '1', ARGV[6] data, ARGV[7] ttl_s); set a
# hash field (KEYS[6], ARGV[8] '1', ARGV[9] field, ARGV[10] value, ARGV[11] ttl_s).
_FINISH = _RELEASE_FN + """
local released = release()
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[3], 'committed', 1) end
-- The fencing counter outlives the attempt (see the module's doc), then expires.
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
if released == 1 then redis.call('HDEL', KEYS[4], ARGV[1]) end
if ARGV[5] == '1' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[7]) end
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[6], ARGV[9], ARGV[10])
  redis.call('EXPIRE', KEYS[6], ARGV[11])
end
return released
"""

# KEYS: lease, active. ARGV: run_key, token (the one seen lapsed), handed_back_json.
# The watchdog's (or a warm stop's) step: only if that attempt still holds the entry.
_REVOKE = """
local a = redis.call('HGET', KEYS[2], ARGV[1])
if not a then return 0 end
local ok, p = pcall(cjson.decode, a)
if not (ok and p['token'] == ARGV[2]) then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Claim:
    token: str
    attempt: int  # attempts started, this one included
    lost: int  # earlier attempts whose process died without ending


@dataclass(frozen=True)
class Start:
    """What `Leases.begin` found: the run claimed, held by a live attempt (`holder`, its
    `active` entry), or not to start at all (cancelled after it was submitted, paused)."""

    claim: Claim | None = None
    holder: dict[str, Any] | None = None
    cancelled_at: float | None = None
    paused: bool = False


def _float(raw: Any) -> float | None:
    try:
        return float(raw) if raw not in (None, b"", "") else None
    except (TypeError, ValueError):
        return None


class Leases:
    """The lease operations, on one Redis client (plain Python; the tasks call it)."""

    def __init__(self, client: redis.Redis, ttl: float | None = None):
        self.client = client
        self.ttl = ttl if ttl is not None else lease_seconds()
        self._claim = client.register_script(_CLAIM)
        self._begin = client.register_script(_BEGIN)
        self._probe = client.register_script(_PROBE)
        self._release = client.register_script(_RELEASE)
        self._finish = client.register_script(_FINISH)
        self._revoke = client.register_script(_REVOKE)
        self._renumber = client.register_script(_RENUMBER)

    @classmethod
    def from_url(cls, url: str, ttl: float | None = None) -> Leases:
        return cls(keys.client(url), ttl)

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def _claimed(self, token: str, reply: Any) -> Claim | dict[str, Any]:
        code, n, lost, holder = cast(list[Any], reply)
        if int(code) == 1:
            return Claim(token=token, attempt=int(n), lost=int(lost))
        try:
            return cast(dict[str, Any], json.loads(holder)) if holder else {}
        except ValueError:
            return {}

    def claim(self, run_key: str, info: dict[str, Any]) -> Claim | dict[str, Any]:
        """Take the run: a Claim, or (when a live attempt holds it) that attempt's info."""
        token = uuid.uuid4().hex
        record = json.dumps({**info, "token": token, "claimed_at": time.time()})
        return self._claimed(token, self._claim(
            keys=[keys.lease(run_key), ACTIVE, keys.attempts(run_key)],
            args=[run_key, token, self.ttl_ms, record, ATTEMPTS_TTL]))

    def begin(self, run_key: str, info: dict[str, Any], experiment: str,
              submitted_at: float | None, task_id: str,
              entry: tuple[str, str, str, int] | None = None) -> Start:
        """What a delivery does first, in one round trip: drop it if its experiment was
        cancelled after `submitted_at` (None: any cancel), park it if the experiment is
        paused, else claim the run (as `claim`), clear the delivery's waiting mark and,
        given `entry` = (hash key, field, JSON object text, ttl_s), set that field to the
        object with `"attempt": <this attempt>` added (the run's live IN_PROGRESS mark)."""
        token = uuid.uuid4().hex
        record = json.dumps({**info, "token": token, "claimed_at": time.time()})
        hkey, field, value, ttl = entry if entry is not None else ("", "", "", 0)
        if entry is not None:
            if not value.endswith("}") or '"attempt"' in value:
                raise ValueError(f"not a JSON object to add an attempt to: {value!r}")
            value = value[:-1] + (', "attempt": ' if value != "{}" else '"attempt": ')
        reply = cast(list[Any], self._begin(
            keys=[keys.lease(run_key), ACTIVE, keys.attempts(run_key), keys.cancel(experiment),
                  keys.paused(experiment), WAITING, hkey or keys.UNUSED, keys.PARKED],
            args=[run_key, token, self.ttl_ms, record, ATTEMPTS_TTL,
                  "" if submitted_at is None else repr(float(submitted_at)), task_id,
                  "1" if entry is not None else "0", field, value, ttl, experiment, repr(time.time())]))
        code = int(reply[0])
        if code == 3:
            return Start(cancelled_at=_float(reply[3]) or 0.0)
        if code == 2:
            return Start(paused=True)
        got = self._claimed(token, reply)
        return Start(claim=got) if isinstance(got, Claim) else Start(holder=got)

    def probe(self, run_key: str, token: str, info: dict[str, Any],
              experiment: str, attempt: int) -> tuple[int, float | None]:
        """Renew the lease of attempt number `attempt` and read the experiment's cancel
        time, in one round trip: (1 renewed, 2 taken back after a lapse nobody acted
        on, 0 fenced for good; cancel time)."""
        record = json.dumps({**info, "token": token})
        code, cancelled = cast(list[Any], self._probe(
            keys=[keys.lease(run_key), ACTIVE, keys.attempts(run_key), keys.cancel(experiment)],
            args=[run_key, token, self.ttl_ms, record, attempt]))
        return int(code), _float(cancelled)

    def renumber(self, run_key: str, claim: Claim, floor: int) -> Claim:
        """`claim` numbered above `floor` (the highest attempt its status file records),
        if it is not already: attempt numbers never repeat, across Redis restarts and
        local mode's fresh Redis per command. The claim as it is if it lost its lease."""
        if claim.attempt > floor:
            return claim
        moved = self._renumber(keys=[keys.lease(run_key), keys.attempts(run_key)],
                               args=[claim.token, claim.attempt, floor + 1])
        return dataclasses.replace(claim, attempt=floor + 1) if int(moved) else claim

    def release(self, run_key: str, token: str) -> bool:
        return bool(self._release(keys=[keys.lease(run_key), ACTIVE], args=[run_key, token]))

    def finish(self, run_key: str, token: str, committed: bool, progress_hash: str,
               log: tuple[str, bytes, int] | None,
               entry: tuple[str, str, str, int] | None = None) -> bool:
        """The end of an attempt, in one round trip: release the lease (True if this
        attempt still held it); count a commit of the run's outputs (for audits: it must
        stay at 1); drop the run's progress entry from `progress_hash` if it was still
        this attempt's; keep its log tail `log` = (key, data, ttl_s) for other hosts; set
        `entry` = (hash key, field, value, ttl_s), the run's live state."""
        key, data, log_ttl = log if log is not None else ("", b"", 0)
        hkey, field, value, ttl = entry if entry is not None else ("", "", "", 0)
        return bool(self._finish(
            keys=[keys.lease(run_key), ACTIVE, keys.attempts(run_key), progress_hash,
                  key or keys.UNUSED, hkey or keys.UNUSED],
            args=[run_key, token, "1" if committed else "0", ATTEMPTS_TTL,
                  "1" if log is not None else "0", data, log_ttl,
                  "1" if entry is not None else "0", field, value, ttl]))

    def revoke(self, run_key: str, token: str, why: str) -> bool:
        """Take the run away from the attempt holding `token` (it may be dead or a zombie):
        its token can then never renew or commit. The next claim does not count it as lost
        when `why` is a warm stop."""
        entry = self.active().get(run_key, {})
        marker = json.dumps({**entry, "token": None, "revoked_token": token, "why": why,
                             "handed_back": why == "handed back", "revoked_at": time.time()})
        return bool(self._revoke(keys=[keys.lease(run_key), ACTIVE], args=[run_key, token, marker]))

    def active(self) -> dict[str, dict[str, Any]]:
        return json_hash(cast(dict[bytes, bytes], self.client.hgetall(ACTIVE)))

    def live(self, run_keys: list[str]) -> set[str]:
        """Which of these runs have a live lease."""
        if not run_keys:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for rid in run_keys:
            pipe.exists(keys.lease(rid))
        return {rid for rid, alive in zip(run_keys, pipe.execute(), strict=True) if alive}

    def wait_mark(self, task_id: str, done: bool = False) -> None:
        """A delivery waiting for another attempt of its run (not an orphan)."""
        if done:
            self.client.hdel(WAITING, task_id)
        else:
            self.client.hset(WAITING, task_id, repr(time.time()))

    def waiting(self) -> set[str]:
        """Task ids of deliveries that marked themselves waiting in the last lease periods."""
        now = time.time()
        raw = cast(dict[bytes, bytes], self.client.hgetall(WAITING))
        stale = [k for k, v in raw.items() if now - float(v) > 3 * self.ttl]
        if stale:
            self.client.hdel(WAITING, *[k.decode() for k in stale])
        return {k.decode() for k in raw if k not in stale}

    def count_failure(self, run_key: str) -> int:
        """One more attempt ended with an exception; returns how many have."""
        # No expiry here: the attempt is still in flight (finish() sets it).
        return int(cast(int, self.client.hincrby(keys.attempts(run_key), "failed", 1)))

    def count_outage(self, run_key: str) -> int:
        """One more attempt met a Redis outage (orchestrator.outage); returns how many have."""
        return int(cast(int, self.client.hincrby(keys.attempts(run_key), "outages", 1)))

    def attempts(self, run_key: str) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(keys.attempts(run_key)))
        return {k.decode(): int(v) for k, v in raw.items()}

    def paused(self, experiment: str) -> bool:
        return bool(self.client.exists(keys.paused(experiment)))

    def parked(self) -> dict[str, float]:
        """Experiments a run of which was parked -> when one last was (begin() notes it)."""
        raw = cast(dict[bytes, bytes], self.client.hgetall(keys.PARKED))
        return {k.decode(): _float(v) or 0.0 for k, v in raw.items()}

    def forget_parked(self, experiment: str) -> None:
        self.client.hdel(keys.PARKED, experiment)

    def pause(self, experiment: str, now: bool) -> None:
        self.client.set(keys.paused(experiment), json.dumps({"at": time.time(), "now": now}))

    def resume(self, experiment: str) -> bool:
        return bool(self.client.delete(keys.paused(experiment)))

    def cancel(self, experiment: str) -> float:
        now = time.time()
        self.client.set(keys.cancel(experiment), repr(now), ex=ATTEMPTS_TTL)
        return now


class _Renewals:
    """One daemon thread per process renews the lease of every running attempt (normally
    one) every ttl/4, whatever the training loop does: no thread is started or joined
    per attempt. A guard's first renewal comes ttl/4 after it was added; `discard`
    returns only once no renewal of that guard is in flight or can follow, so an ended
    attempt never takes its released lease back."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread does not survive a fork

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[LeaseGuard, float] = {}
        self._thread: threading.Thread | None = None
        self._wake: float | None = None  # when the waiting thread wakes by itself (None: never)

    def add(self, guard: LeaseGuard) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="orch-lease-renewals", daemon=True)
                self._thread.start()
            due = self._due[guard] = time.monotonic() + guard.interval
            # Wake the thread only if it would sleep past this renewal: runs shorter than
            # a renewal interval, one after another, then cost no thread switch each.
            if self._wake is None or due < self._wake:
                self._cond.notify()

    def discard(self, guard: LeaseGuard) -> None:
        with self._cond:  # held by the thread while it renews: wait for that renewal
            self._due.pop(guard, None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for guard in [g for g, due in self._due.items() if due <= now]:
                    try:
                        alive = guard.beat()
                    except Exception:  # never lose the thread: the commit checks again
                        alive = True
                    if alive:
                        self._due[guard] = time.monotonic() + guard.interval
                    else:  # fenced: nothing more to renew
                        self._due.pop(guard, None)
                self._wake = wake = min(self._due.values(), default=None)
                self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))
                self._wake = None  # awake (until the next wait): an add need not notify


_RENEWALS = _Renewals()


class LeaseGuard:
    """The fence of one attempt on a worker: lease renewals, cancel check, commit check.

    Use as a context manager around the attempt; `check()` before every write that
    makes the run's result visible (runner.execute calls it). While it is entered the
    process's renewal thread renews the lease every ttl/4 and reads the experiment's
    cancel mark, in one round trip. `fenced` becomes set when the lease turns out to
    belong to another attempt, or the experiment was cancelled: the run's work will be
    discarded, and a reporter that sees the flag stops the trainer early."""

    def __init__(self, leases: Leases, run_key: str, claim: Claim, info: dict[str, Any],
                 experiment: str, submitted_at: float | None):
        self.leases, self.run_key, self.token = leases, run_key, claim.token
        self.attempt = claim.attempt  # the fencing number (leases' module doc)
        self.tag = claim.token
        self.info = {**info, "attempt": claim.attempt}
        self.experiment, self.submitted_at = experiment, submitted_at
        self.interval = max(0.05, leases.ttl / 4)
        self.fenced = threading.Event()
        self.reason = ""
        # When Redis last confirmed that this attempt holds the run (the claim, just
        # before the guard is made; then every successful renewal).
        self.confirmed = time.monotonic()

    def __enter__(self) -> LeaseGuard:
        _RENEWALS.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _RENEWALS.discard(self)

    def _probe(self) -> tuple[str, bool] | None:
        """One round trip: renew the lease, read the cancel mark. (why, cancelled) if
        this attempt must stop, else None. Raises redis.RedisError."""
        asked = time.monotonic()
        code, at = self.leases.probe(self.run_key, self.token, self.info, self.experiment,
                                     self.attempt)
        if code != 0:
            self.confirmed = asked
        if code == 0:
            return "its lease was handed to another attempt", False
        if at is not None and (self.submitted_at is None or at > self.submitted_at):
            return "cancelled: its experiment was cancelled (orchestrator cancel)", True
        return None

    def beat(self) -> bool:
        """A renewal (from the renewal thread); False once the attempt is fenced."""
        try:
            stop = self._probe()
        except redis.RedisError:
            return True  # Redis unreachable: keep trying; the commit checks again
        if stop is not None:
            self.reason = stop[0]
            self.fenced.set()
            return False
        return True

    def stop_reason(self) -> str | None:
        return self.reason if self.fenced.is_set() else None

    def check(self, fresh: bool = True) -> None:
        """Raise RunStopped unless this attempt still holds the run: as Redis says now
        (one round trip), or (fresh=False) as its renewals know, if Redis confirmed it
        within the last half lease; else (a worker cut off from Redis, or paused: its
        renewals failed or never ran) Redis is asked now, before anything is written.
        Redis may be restarting: keep asking for up to a minute before giving up (then
        the attempt fails; nothing was written)."""
        from ..errors import RunStopped

        if (why := self.stop_reason()) is not None:
            raise RunStopped(why, cancelled=why.startswith("cancelled"))
        if not fresh and time.monotonic() - self.confirmed < self.leases.ttl / 2:
            return
        deadline = time.monotonic() + 60
        while True:
            try:
                stop = self._probe()
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
                continue
            if stop is not None:
                raise RunStopped(stop[0], cancelled=stop[1])
            return
