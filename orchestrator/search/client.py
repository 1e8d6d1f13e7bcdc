"""A search from the submitting side, as opposed to the control side (engine): what
`orchestrator submit`/`run`, `orchestrator search best` and the Python API
(orchestrator.api) do with one. Plain Python: no printing; Optuna stays out of it."""

from __future__ import annotations

import os
import time
from typing import Any

from ..experiment.config import Experiment
from ..paths import Layout

# When this process began saving each search: a watchdog's step may publish its first
# trials as soon as search.json appears, and start_searches must not publish them again.
_saved_at: dict[str, float] = {}


def save_searches(exps: list[Experiment], layout: Layout) -> list[str]:
    """Record each search's config (refused, exit 2, if it changed what its trials mean);
    returns the names of the searches that have not ended."""
    if not exps:
        return []
    from .engine import progress, read_history, save_search, search_of

    todo = []
    for exp in exps:
        _saved_at[exp.name] = time.time()
        search = search_of(exp)
        save_search(layout, search)
        if not progress(search, read_history(layout, exp.name))["finished"]:
            todo.append(exp.name)
    return todo


def start_searches(names: list[str]) -> None:
    """A step of each search on the control queue of the broker of ORCH_BROKER_URL
    (cluster.endpoints.use_broker), publishing again what was in flight before this
    submission saved the search (the broker may have lost it; what a step published
    since, e.g. the watchdog's as soon as search.json appeared, is not sent twice: a
    duplicate delivery would hold a worker, waiting on the lease, as long as the run trains).
    EnvironmentProblem if the broker cannot be reached."""
    if not names:
        return
    from celery.exceptions import OperationalError
    from kombu.exceptions import KombuError
    from redis.exceptions import RedisError

    from tasks import app

    from ..errors import EnvironmentProblem
    from .rungs import SEARCH_STEP

    try:
        for name in names:
            app.send_task(SEARCH_STEP, args=(name, _saved_at.get(name, time.time())), queue="control")
    except (OperationalError, KombuError, RedisError) as exc:
        raise EnvironmentProblem(f"cannot reach the broker at {os.environ['ORCH_BROKER_URL']}: {exc}") from None


def best_report(layout: Layout, experiment: str, top: int) -> dict[str, Any]:
    """What `orchestrator search best EXPERIMENT --top TOP --json` prints: the strategy,
    metrics and directions, the progress (with `best_trial`, a number), and `trials`:
    the `top` best, best first (orchestrator.views.search.trial_row: number, generation,
    state, values, score, params, point, error, groups with their files).
    ExperimentNotFound if `experiment` is not a submitted search."""
    from ..views.search import best_rows
    from .engine import progress

    search, h, rows = best_rows(layout, experiment, top)
    state = progress(search, h)
    best = state.pop("best")
    return {"experiment": experiment, "strategy": search.cfg.strategy,
            "metrics": list(search.cfg.metrics), "directions": list(search.cfg.directions),
            "progress": {**state, "best_trial": None if best is None else best.number},
            "trials": rows}


def search_plan(layout: Layout, exp: Experiment) -> dict[str, Any]:
    """A search's plan (`orchestrator plan`, `Client.plan`): its config, what it has done,
    and the proposals its next step would make (from its records and seed: the same ones
    the step will record)."""
    from .engine import progress, propose, read_history, search_of

    search = search_of(exp)
    h = read_history(layout, exp.name)
    state = progress(search, h)
    state.pop("best")
    nxt = [e for e in propose(search, h) if e["type"] in ("trial", "promote")]
    per_trial = len(search.datasets) * len(search.seeds)
    return {"experiment": exp.name, "search": search.cfg.to_dict(), "progress": state,
            "groups_per_trial": per_trial, "runs_per_trial": per_trial * search.template.n_folds,
            "next": [{"number": e["number"], "params": e.get("params"), "point": e.get("point"),
                      "promote_to": e.get("budget") if e["type"] == "promote" else None}
                     for e in nxt]}
