"""The watchdog: finds runs whose lease lapsed and hands them to another worker; notices
when Redis lost its data and re-dispatches unfinished work from the status files.

Plain Python over Redis. Celery/kombu specifics (how a message is put back on its
queue, how groups are published) come in as functions, from tasks/watchdog.py.
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

log = logging.getLogger(__name__)
REVOKED_KEEP_SECONDS = 24 * 3600  # revoked entries count as lost attempts until then
# A delivered training message nobody holds a lease for, this many lease periods after
# its delivery, was lost by its worker before it started.
ORPHAN_GRACE_LEASES = 3


def watchdog_interval() -> float:
    """ORCH_WATCHDOG_INTERVAL (default 2 s): how often the watchdog looks."""
    return float(settings.value("ORCH_WATCHDOG_INTERVAL"))


class Watchdog:
    def __init__(self, leases: Leases, restore: Callable[[str], bool],
                 redispatch: Callable[[], dict[str, int]], name: str | None = None,
                 interval: float | None = None,
                 orphans: Callable[[set[str], float], list[str]] | None = None,
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
            for name in self.orphans(known, ORPHAN_GRACE_LEASES * self.leases.ttl):
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
