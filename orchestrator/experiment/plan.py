"""What submitting an experiment would do, given what the results root already holds.

Per group: skip it (status.json DONE for exactly these runs), only finalize it (every
fold DONE but no status.json DONE), or run its missing/failed folds and then finalize.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..collect.results import read_final_results
from ..collect.status import fold_is_done, fold_state, group_record_done, read_group_status
from ..paths import Layout
from .expand import groups
from .spec import RunSpec

SKIP, FINALIZE, RUN = "skip", "finalize", "run"


@dataclass(frozen=True)
class GroupPlan:
    specs: tuple[RunSpec, ...]
    todo: tuple[RunSpec, ...]  # folds to train
    action: str  # SKIP, FINALIZE or RUN
    # The group has no status folder: no record to reset or read (how the plan was
    # found, not what it is: plans compare equal without it).
    fresh: bool = field(default=False, compare=False)

    @property
    def first(self) -> RunSpec:
        return self.specs[0]


def has_status_dir(layout: Layout, spec: RunSpec) -> bool:
    """Whether the group of `spec` has a status folder. Every status record (a fold's,
    the group's) lives in it: without it there is none to read, and one stat replaces
    a failed open per fold (a fresh experiment of 1000 runs: 1000 opens)."""
    return os.path.isdir(layout.status_dir(spec))  # False on any error, as a failed read is


def make_plan(layout: Layout, runs: list[RunSpec]) -> list[GroupPlan]:
    """Runs of ONE experiment -> what to do per group (see the module docstring).

    A group is skipped only if its status.json says DONE, its ensemble files are intact
    and final_results.csv has its rows: anything less is rebuilt by a finalize."""
    plans: list[GroupPlan] = []
    listed: set[str] | None = None
    for specs in groups(runs):
        if not has_status_dir(layout, specs[0]):  # new group: no record of any fold
            plans.append(GroupPlan(specs=tuple(specs), todo=tuple(specs), action=RUN, fresh=True))
            continue
        todo = tuple(s for s in specs if not fold_is_done(layout, s))
        if todo:
            action = RUN
        else:
            run_ids = sorted(s.run_id for s in specs)
            done = group_record_done(layout, specs[0], read_group_status(layout, specs[0]), run_ids)
            if done:
                if listed is None:
                    listed = {r["run_id"] for r in read_final_results(layout, specs[0].experiment)}
                done = listed.issuperset(run_ids)
            action = SKIP if done else FINALIZE
        plans.append(GroupPlan(specs=tuple(specs), todo=todo, action=action))
    return plans


def totals(plans: list[GroupPlan]) -> dict[str, int]:
    runs = sum(len(p.specs) for p in plans)
    todo = sum(len(p.todo) for p in plans)
    return {"runs": runs, "done": runs - todo, "to_run": todo, "groups": len(plans),
            "groups_to_finalize": sum(p.action != SKIP for p in plans)}


def plan_rows(layout: Layout, plans: list[GroupPlan]) -> list[dict[str, Any]]:
    """One row per run. A fresh group (no status folder) has no record to read: its runs
    are NEW without building each fold's path and failing to open it (a new experiment of
    100,000 runs: 7 s)."""
    return [{"name": s.name, "run_id": s.run_id, "group_id": s.group_id, "queue": s.queue,
             "state": "NEW" if p.fresh else fold_state(layout, s)[0]} for p in plans for s in p.specs]
