"""The watchdog: finds runs whose lease lapsed and hands them to another worker; hands
on messages whose worker died before starting them (OrphanRule); notices when Redis lost
its data and re-dispatches unfinished work from the status files; runs chores, among
them the stall guard (cluster.stall).

Plain Python over Redis. Celery/kombu specifics (how a message is put back on its
queue, how groups are published) come in as functions, from tasks/watchdog.py and
tasks/redelivery.py.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis

from .. import settings
from ..execution.leases import Leases
from ..keys import ACTIVE, EPOCH, WATCHDOG_LOCK
from . import registry

log = logging.getLogger(__name__)
REVOKED_KEEP_SECONDS = 24 * 3600  # revoked entries count as lost attempts until then
# A delivered training message nobody holds a lease for, this many lease periods after
# its delivery, was lost by its worker before it started.
ORPHAN_GRACE_LEASES = 3
# ...or sooner, once the worker that took it (its main process, named on the message)
# is known dead: its record left the registry (it expires within three heartbeats of
# the last), or a new process of the same name has been up TAKER_DEAD_FOR seconds. Not
# sooner than that after the death: a run that finished just before it carries Celery's
# claim to send its chord body (10 s in Celery 5.7: twice the 5 s join timeout), and
# a second run of the message that returns while that claim stands never sends it:
# the group would hang with every fold done.
TAKER_DEAD_FOR = 10.0


class OrphanRule:
    """Whether an unacknowledged training message that no attempt holds (nor waits on)
    was lost by its worker: `rule(age, taker)`, with its age since delivery and the
    [node name, pid] its worker stamped on it (None for older messages). Reads the
    registry once, at the first message that needs it: after the caller read the
    deliveries (a taker registers before its first pop, so a live taker is always seen).
    A live worker starved or cut off past its record's expiry may lose its message this
    way; fencing makes that safe (its own start finds the run claimed or committed by the
    successor and writes nothing)."""

    def __init__(self, client: redis.Redis, lease_ttl: float):
        self.client, self.grace = client, ORPHAN_GRACE_LEASES * lease_ttl
        self._records: dict[str, registry.WorkerRecord] | None = None

    def __call__(self, age: float, taker: Any) -> bool:
        if age >= self.grace:
            return True
        if (age < TAKER_DEAD_FOR or not isinstance(taker, list) or len(taker) != 2
                or not isinstance(taker[0], str) or type(taker[1]) is not int):
            return False
        if self._records is None:
            self._records = {r.name: r for r in registry.list_workers(self.client)}
        now = self._records.get(taker[0])
        return now is None or (now.pid != taker[1] and time.time() - now.started >= TAKER_DEAD_FOR)


def watchdog_interval() -> float:
    """ORCH_WATCHDOG_INTERVAL (default 2 s): how often the watchdog looks."""
    return float(settings.value("ORCH_WATCHDOG_INTERVAL"))


class Watchdog:
    def __init__(self, leases: Leases, restore: Callable[[str], bool],
                 redispatch: Callable[[], dict[str, int]], name: str | None = None,
                 interval: float | None = None,
                 orphans: Callable[[set[str], OrphanRule], list[str]] | None = None,
                 chores: list[Callable[[], list[str]]] | None = None):
        self.leases = leases
        self.orphans = orphans
        self.chores = chores or []
        self.client: redis.Redis = leases.client
        self.restore = restore
        self.redispatch = redispatch
        self.name = name or f"watchdog-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.interval = interval if interval is not None else watchdog_interval()
        self.epoch: bytes | None = None

    def _hold_lock(self) -> bool:
        """One watchdog acts at a time, however many control workers run."""
        ttl = int(self.interval * 5 * 1000)
        if self.client.set(WATCHDOG_LOCK, self.name, nx=True, px=ttl):
            return True
        if self.client.get(WATCHDOG_LOCK) == self.name.encode():
            self.client.pexpire(WATCHDOG_LOCK, ttl)
            return True
        return False

    def tick(self) -> list[str]:
        """One look; returns what it did, one line per action (also logged)."""
        if not self._hold_lock():
            return []
        actions = self._check_epoch()
        active = self.leases.active()
        held = [rid for rid, e in active.items() if e.get("token")]
        live = self.leases.live(held)
        now = time.time()
        for run_id, entry in active.items():
            token = entry.get("token")
            if not token:
                if now - float(entry.get("revoked_at") or 0) > REVOKED_KEEP_SECONDS:
                    self.client.hdel(ACTIVE, run_id)
                continue
            if run_id in live:
                continue
            if not self.leases.revoke(run_id, token, why="lease lapsed"):
                continue  # it ended or renewed in between
            task_id = str(entry.get("task_id") or "")
            restored = bool(task_id) and self.restore(task_id)
            action = (f"{entry.get('name', run_id)}: the lease of {entry.get('worker', '?')} lapsed; "
                      + ("its message is back on its queue for another worker" if restored
                         else "no unacknowledged message left to restore"))
            log.warning("watchdog: %s", action)
            actions.append(action)
        if self.orphans is not None:
            known = {str(e.get("task_id")) for e in active.values() if e.get("token")}
            known |= self.leases.waiting()
            for name in self.orphans(known, OrphanRule(self.client, self.leases.ttl)):
                action = f"{name}: delivered but never started (its worker lost it); back on its queue"
                log.warning("watchdog: %s", action)
                actions.append(action)
        for chore in self.chores:
            for action in chore():
                log.warning("watchdog: %s", action)
                actions.append(action)
        return actions

    def _check_epoch(self) -> list[str]:
        """A key that only disappears when Redis loses its data (a restart without
        persistence, a flush): then queued runs and chord counters are gone too."""
        current = cast(bytes | None, self.client.get(EPOCH))
        if current is not None:
            self.epoch = current
            return []
        self.client.set(EPOCH, uuid.uuid4().hex, nx=True)
        seen_before, self.epoch = self.epoch is not None, cast(bytes | None, self.client.get(EPOCH))
        if not seen_before:
            return []
        counts = self.redispatch()
        action = (f"Redis lost its data: re-dispatched {counts.get('runs', 0)} runs in "
                  f"{counts.get('groups', 0)} groups and {counts.get('finalize_only', 0)} "
                  "finalize-only groups from the status files")
        log.warning("watchdog: %s", action)
        return [action]

    def run_forever(self, stop: Any) -> None:
        """Loop until `stop` (a threading.Event) is set; Redis errors only delay it."""
        while not stop.wait(self.interval):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.info("watchdog: Redis unreachable (%s); retrying", exc)
            except Exception:
                log.exception("watchdog: tick failed")
