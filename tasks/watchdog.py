"""Worker-side reliability hooks, connected through Celery signals:

- In every worker that consumes `control`: the watchdog thread (orchestrator.cluster.watchdog),
  with kombu's own restore of an unacknowledged message as the way to hand a run back.
- In every worker: on shutdown, the runs it holds are handed back at once (their
  leases revoked as "handed back"), so a warm stop does not wait for a lease to lapse.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from . import app
from .redelivery import in_flight, restore_message, restore_orphans

log = logging.getLogger(__name__)
_stop = threading.Event()


# A parked index entry outlives its queue's last park by this much before it is dropped.
PARKED_FORGET_SECONDS = 60.0


def unpark_unpaused() -> list[str]:
    """Parked queues of experiments that are no longer paused (a run parked in the
    moment `resume` ran): move them back. The watchdog calls this every tick. The parked
    index (keys.PARKED, written where a run is parked) names them: no walk of the
    keyspace, whose size grows with every run's results and logs."""
    import time

    from orchestrator.dispatch.canvas import unpark

    done: list[str] = []
    leases = _leases()
    now = time.time()
    for name, at in sorted(leases.parked().items()):
        if not name or leases.paused(name):
            continue
        if moved := unpark(name):
            done.append(f"{name}: {len(moved)} parked runs back on their queues (not paused)")
        elif now - at > PARKED_FORGET_SECONDS:
            leases.forget_parked(name)  # (`resume` itself moves its parked runs back)
    return done


def _leases() -> Any:
    from orchestrator.execution.leases import Leases

    return Leases.from_url(app.conf.orch_state_url)


def _redispatch(only: str | None = None) -> dict[str, int]:
    from orchestrator.dispatch.canvas import redispatch
    from orchestrator.livestate import LiveState
    from orchestrator.paths import Layout

    return redispatch(Layout(app.conf.orch_results_root), LiveState.from_url(app.conf.orch_state_url), only)


@worker_ready.connect
def _start_watchdog(sender: Any = None, **_: Any) -> None:
    queues = set(app.amqp.queues.consume_from or {})
    if "control" not in queues:
        return
    from orchestrator.cluster.stall import StallGuard
    from orchestrator.cluster.watchdog import Watchdog
    from orchestrator.paths import Layout

    from .search import advance_searches

    leases = _leases()
    stalls = StallGuard(leases, Layout(app.conf.orch_results_root), in_flight, _redispatch)
    dog = Watchdog(leases, restore_message, _redispatch, orphans=restore_orphans,
                   chores=[unpark_unpaused, advance_searches, stalls],
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
