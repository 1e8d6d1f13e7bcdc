"""The watchdog's last safety net: an experiment whose work stopped moving.

kombu's Redis transport takes a message off its queue (BRPOP) and only then records it
as unacknowledged. A message is lost for good if its worker dies in between, or if the
reply never reaches the worker (a host cut off while it waited for work; a warm stop
that drops what was already in its socket, celery#4354): no lease lapses and no
unacknowledged copy is left for the orphan rule. Its group would never end. The same
holds for a group whose chord body was never sent.

The rule (`StallGuard`, one of the watchdog's chores): when no message is queued
anywhere (no queue or parked list exists), an experiment that is still open in the live
state (a run not final, or fewer final groups than its manifest has) while nothing of it
is in flight (no lease held, no unacknowledged message of it) for STALL_LEASES lease
periods, is published again from the results root: each group that the status files say
is not final, its folds not yet committed (canvas.redispatch, as after a Redis data
loss). Committed folds are not repeated; a fresh chord finalizes the group once, and the
old one, short of its lost part, never fires. Experiments that are paused are left alone, and so are searches: their steps adopt their
own lost groups.
An experiment found open but with nothing to publish is not looked at again until its
live state changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import cast

from .. import keys
from ..collect.status import Status
from ..dispatch.manifest import load_manifest
from ..execution.leases import Leases
from ..livestate import status_of
from ..paths import Layout

log = logging.getLogger(__name__)
STALL_LEASES = 2  # periods of quiet before an open experiment counts as stalled
FINAL = {s.value for s in Status if s.final}


class StallGuard:
    """`guard()` -> what it did, one line per experiment published again.

    `in_flight()` returns None while any message is queued anywhere, else the names of
    the experiments that have an unacknowledged message. `republish(name)` publishes the
    experiment's unfinished groups again and returns canvas.redispatch's counts."""

    def __init__(self, leases: Leases, layout: Layout, in_flight: Callable[[], set[str] | None],
                 republish: Callable[[str], dict[str, int]]):
        self.leases, self.client, self.layout = leases, leases.client, layout
        self.in_flight, self.republish = in_flight, republish
        self.seconds = STALL_LEASES * leases.ttl
        self.every = leases.ttl / 2  # the walks of the keyspace it takes: not every tick
        self.looked = 0.0
        self.since: dict[str, float] = {}
        self.settled: dict[str, tuple[int, int, int]] = {}  # name -> live state seen, nothing to do

    def __call__(self) -> list[str]:
        if time.time() - self.looked < self.every:
            return []
        self.looked = time.time()
        busy = self.in_flight()
        if busy is None:
            self.since.clear()
            return []
        busy |= {str(e.get("experiment")) for e in self.leases.active().values() if e.get("token")}
        now = time.time()
        open_now = {name for name, seen in self._open().items()
                    if name not in busy and self.settled.get(name) != seen and not self.leases.paused(name)}
        self.since = {name: self.since.get(name, now) for name in open_now}
        actions = []
        for name, since in list(self.since.items()):
            if now - since < self.seconds:
                continue
            del self.since[name]
            counts = self.republish(name)
            if not counts.get("groups") and not counts.get("finalize_only"):
                self.settled[name] = self._open().get(name, (0, 0, 0))
                continue
            actions.append(f"{name}: nothing of it queued or in flight for {now - since:.0f} s with groups "
                           f"unfinished: published again {counts.get('runs', 0)} runs in "
                           f"{counts.get('groups', 0)} groups and {counts.get('finalize_only', 0)} "
                           "finalize-only groups from the status files")
        return actions

    def _open(self) -> dict[str, tuple[int, int, int]]:
        """Experiments open in the live state -> (runs, final runs, final groups): what
        the live state said when it was judged (a change means new news)."""
        found: dict[str, tuple[int, int, int]] = {}
        suffix = ":runs"
        prefix = keys.exp_runs("")[: -len(suffix)]
        for key in self.client.scan_iter(match=f"{prefix}*{suffix}", count=5000):
            name = key.decode()[len(prefix):-len(suffix)]
            if self.layout.search_dir(name).is_dir():
                continue  # a search's steps adopt its own lost groups (orchestrator.search.engine)
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(keys.exp_runs(name))
            pipe.hgetall(keys.exp_groups(name))
            runs, groups = cast(list[dict[bytes, bytes]], pipe.execute())
            final_runs = sum(1 for v in runs.values() if status_of(v) in FINAL)
            final_groups = sum(1 for v in groups.values() if v.decode() in FINAL)
            seen = (len(runs), final_runs, final_groups)
            if final_runs < len(runs) or final_groups < self._groups(name):
                found[name] = seen
        return found

    def _groups(self, name: str) -> int:
        try:
            return len(load_manifest(self.layout, name).get("groups", []))
        except Exception:  # no manifest here (another results root): not this guard's
            return 0

