"""Build and publish the Celery canvas: per group, chord(train_run per fold, finalize).

The only module of the orchestrator that imports `tasks`.
"""

from __future__ import annotations

import time
from typing import Any

from celery import chord

from tasks import app
from tasks.training import finalize, group_failed, train_run

from .config import Experiment
from .livestate import LiveState
from .paths import Layout, atomic_write_bytes
from .plan import FINALIZE, RUN, SKIP, GroupPlan
from .spec import RunSpec, canonical_json
from .status import Status, read_fold_status, reset_group_status, write_fold_status


def _stop_listening_for_results() -> None:
    """Tell this (submitting) process's result backend not to listen for results.

    Celery's Redis backend SUBSCRIBEs the publishing process to each task's result
    channel, when the task is sent (`on_task_call`) and when a group/chord result is
    built (`add_pending_result`, via a barrier over the parts), so that
    `AsyncResult.get()` can wake up. The orchestrator never waits on Celery results
    (progress comes from the live state), so the subscriptions only cost a round trip
    per task, and the results they pin are collected at interpreter exit, when their
    `__del__` tries to unsubscribe from a Redis that local mode has already stopped
    (a traceback after a successful run). Workers and Flower are not affected: this
    changes only the backend object of the current thread of this process.
    """
    backend = app.backend
    backend.on_task_call = lambda producer, task_id: None
    backend.add_pending_result = lambda result, weak=False, start_drainer=True: result


def message_priority(priority: int) -> int:
    """YAML priority 9 is the most urgent; kombu's Redis transport serves 0 first."""
    return 9 - priority


def _train_signature(spec: RunSpec, data: dict[str, Any]) -> Any:
    options: dict[str, Any] = {
        "queue": spec.queue, "priority": message_priority(spec.priority),
        "argsrepr": repr(spec.name), "kwargsrepr": "{}",
    }
    if spec.timeout is not None:
        options["soft_time_limit"] = spec.timeout
        options["time_limit"] = spec.timeout + 30  # hard kill if the soft limit is ignored
    return train_run.signature(args=(data,), **options)


def _group_options(plan: GroupPlan) -> dict[str, Any]:
    return {"queue": "control", "argsrepr": repr(plan.first.group_name), "kwargsrepr": "{}"}


def write_manifest(layout: Layout, exp: Experiment, plans: list[GroupPlan],
                   dicts: dict[str, dict[str, Any]]) -> None:
    """<root>/<experiment>/experiment.json: what the last submission contained.
    Compact JSON: it is read by programs, and can hold thousands of specs."""
    atomic_write_bytes(layout.manifest(exp.name), canonical_json({
        "experiment": exp.name, "config": exp.file, "trainer": exp.trainer.name,
        "submitted_at": time.time(), "results_root": str(layout.root),
        "groups": [{
            "group_id": p.first.group_id, "name": p.first.group_name, "dir": p.first.group_dir,
            "run_ids": sorted(s.run_id for s in p.specs), "runs": [dicts[s.run_id] for s in p.specs],
        } for p in plans],
    }).encode())


def submit(exp: Experiment, plans: list[GroupPlan], layout: Layout, live: LiveState) -> dict[str, int]:
    """Publish what the plan says; returns counts of what was published."""
    dicts = {s.run_id: s.to_dict() for p in plans for s in p.specs}
    write_manifest(layout, exp, plans, dicts)
    states: dict[str, str] = {}
    for p in plans:
        if p.action == RUN:
            reset_group_status(layout, p.first)
        for s in p.specs:
            states[s.run_id] = Status.PENDING.value if s in p.todo else Status.DONE.value
            if s in p.todo:
                old = read_fold_status(layout, s)
                if old is not None and old.get("status") != Status.PENDING.value:
                    write_fold_status(layout, s, Status.PENDING, error=old.get("error"))
    live.set_runs(exp.name, states)
    live.clear_groups(exp.name, [p.first.group_id for p in plans if p.action != SKIP])
    for p in plans:
        if p.action == SKIP:
            live.set_group(exp.name, p.first.group_id, Status.DONE.value)

    published = {"runs": 0, "groups": 0, "finalize_only": 0}
    _stop_listening_for_results()
    with app.producer_or_acquire() as producer:
        for p in plans:
            specs = [dicts[s.run_id] for s in p.specs]
            body = finalize.signature(args=(specs,), **_group_options(p))
            if p.action == RUN:
                errback = group_failed.signature(kwargs={"specs": specs}, queue="control")
                header = [_train_signature(s, dicts[s.run_id]) for s in p.todo]
                chord(header, app=app)(body.on_error(errback), producer=producer)
                published["runs"] += len(header)
                published["groups"] += 1
            elif p.action == FINALIZE:
                body.apply_async(args=([],), producer=producer)  # results=[], then (specs,)
                published["finalize_only"] += 1
    return published
