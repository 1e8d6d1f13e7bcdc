"""Steering experiments on a running cluster: cancel, pause, resume (plain Python over
Redis and files)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from ..collect.finalize import mark_group_failed
from ..collect.status import Status, fold_state, write_fold_status
from ..execution.leases import Leases
from ..experiment.spec import RunSpec
from ..livestate import LiveState
from ..paths import Layout, atomic_write_json, read_json
from .manifest import load_manifest

CANCELLED_WHY = "cancelled (orchestrator cancel)"


def cancel_experiment(layout: Layout, experiment: str, leases: Leases,
                      live: LiveState) -> dict[str, int]:
    """Cancel what is left of an experiment's last submission.

    From now on, every message of it published before this moment is dropped when a
    worker reaches it; runs that are training stop at their next progress report (or at
    the latest before they write anything) and record CANCELLED themselves; queued runs
    are marked CANCELLED here, and so are groups with nothing running. Submitting the
    experiment again resumes it (newer messages are not affected)."""
    manifest = load_manifest(layout, experiment)
    leases.cancel(experiment)
    groups = [[RunSpec.from_dict(r) for r in group.get("runs", [])] for group in manifest.get("groups", [])]
    return cancel_queued(layout, experiment, groups, leases, live)


def cancel_queued(layout: Layout, experiment: str, groups: list[list[RunSpec]], leases: Leases,
                  live: LiveState) -> dict[str, int]:
    """Mark the runs of `groups` that are neither finished nor training CANCELLED, and the
    groups with nothing left running CANCELLED too; counts as cancel_experiment's. A
    queued message of a run marked here reports CANCELLED when a worker reaches it
    (a record that ended after the message was sent: execution.attempt). Without the
    experiment's cancel mark (cancel_experiment sets it), runs training go on: what
    `RunFuture.cancel` of the Python API does for one evaluation."""
    active = {rid for rid, e in leases.active().items()
              if e.get("token") and e.get("experiment") == experiment}
    counts = {"queued": 0, "running": 0, "groups": 0}
    now = time.time()
    states: dict[str, str] = {}
    for specs in groups:
        running_here = False
        cancelled_here = False
        for spec in specs:
            state, record = fold_state(layout, spec)
            if state in (Status.DONE.value, Status.FAILED.value):
                continue
            if spec.run_key in active:
                counts["running"] += 1
                running_here = True
                continue
            cancelled_here = True
            if state != Status.CANCELLED.value:
                write_fold_status(layout, spec, Status.CANCELLED, base=record or None,
                                  error=CANCELLED_WHY, finished_at=now)
                states[spec.run_id] = Status.CANCELLED.value
                counts["queued"] += 1
        if cancelled_here and not running_here and specs:
            mark_group_failed(layout, specs, live=live)  # all folds final: CANCELLED
            counts["groups"] += 1
    live.set_runs(experiment, states)
    return counts


def describe(counts: dict[str, Any]) -> str:
    return (f"{counts['queued']} queued runs CANCELLED, {counts['running']} running runs "
            f"stopping, {counts['groups']} groups CANCELLED")


def pause_experiment(layout: Layout, experiment: str, leases: Leases, now: bool) -> dict[str, Any]:
    """No new run of the experiment starts: a worker that reaches one parks it in the
    experiment's parked queue (still the same message, same chord). Running runs finish,
    or with `now` are handed back at once (they stop at their next report, write
    nothing, and their message is requeued, then parked)."""
    load_manifest(layout, experiment)  # ExperimentNotFound for an unknown name
    leases.pause(experiment, now)
    atomic_write_json(layout.paused_marker(experiment), {"paused_at": time.time(), "now": now})
    handed = 0
    if now:
        for run_id, entry in leases.active().items():
            if entry.get("experiment") == experiment and entry.get("token"):
                handed += leases.revoke(run_id, entry["token"], why="handed back")
    return {"handed_back": handed}


def resume_experiment(layout: Layout, experiment: str, leases: Leases,
                      unpark: Any) -> dict[str, Any]:
    """Let the experiment's runs start again: parked runs go back to their queues."""
    load_manifest(layout, experiment)
    # Move the parked runs while the experiment is still paused (the watchdog leaves a
    # paused experiment's queue alone, so the count is this command's), then lift the
    # pause, then catch a run parked in between.
    moved = set(unpark(experiment))
    leases.resume(experiment)
    with contextlib.suppress(FileNotFoundError):
        layout.paused_marker(experiment).unlink()
    moved |= set(unpark(experiment))  # a run moved, taken and parked again counts once
    return {"unparked": len(moved)}


def paused_info(layout: Layout, experiment: str) -> dict[str, Any] | None:
    """The pause record (from the results root: no Redis needed), or None."""
    data = read_json(layout.paused_marker(experiment))
    return data if isinstance(data, dict) else None
