"""Searches seen from the records: waiting for one to end, its best trials, a line of
progress. Read-only (the journal and the group records); no Optuna."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import ExperimentNotFound
from ..experiment.expand import groups
from ..paths import Layout
from ..search.engine import Search, best_trials, load_search, progress, read_history
from ..search.journal import History, Trial


def require_search(layout: Layout, experiment: str) -> Search:
    search = load_search(layout, experiment)
    if search is None:
        raise ExperimentNotFound(f"no search {experiment!r} under {layout.root} (a search is an "
                                 f"experiment with a `search:` block, once submitted)")
    return search


def progress_line(name: str, state: dict[str, Any]) -> str:
    best = state.get("best")
    shown = (f", best {best.values[0]:.4g} (trial {best.number})" if best is not None and best.values else "")
    return (f"search {name}: {state['complete'] + state['failed'] + state['pruned']}/{state['trials']} trials "
            f"({state['complete']} complete, {state['failed']} failed, {state['pruned']} pruned, "
            f"{state['running']} running), generation {state['generation']}{shown}")


def wait_searches(layout: Layout, names: list[str], check: Callable[[], None] | None = None,
                  interval: float = 0.2) -> dict[str, dict[str, Any]]:
    """Block until every named search has ended; a progress line when anything changes
    (at most every 2 s). Returns each one's final progress."""
    last: dict[str, str] = {}
    shown_at = 0.0
    while True:
        if check is not None:
            check()
        states = {}
        for name in names:
            search = require_search(layout, name)
            states[name] = progress(search, read_history(layout, name))
        lines = {n: progress_line(n, s) for n, s in states.items()}
        now = time.monotonic()
        ended = all(s["finished"] for s in states.values())
        if lines != last and (now - shown_at > 2 or ended):
            for line in lines.values():
                print(line, file=sys.stderr, flush=True)
            last, shown_at = lines, now
        if ended:
            return states
        time.sleep(interval)


def trial_row(layout: Layout, search: Search, trial: Trial) -> dict[str, Any]:
    """A trial for people and scripts: its parameters, score and files."""
    files = []
    for specs in groups(search.specs(trial)):
        first = specs[0]
        files.append({"group": first.group_name, "dir": str(layout.group_dir(first)),
                      "status.json": str(layout.group_status(first)),
                      "metrics.json": str(layout.ensemble_files(first)["metrics.json"])})
    return {"number": trial.number, "generation": trial.generation, "state": trial.state,
            "values": dict(zip(search.cfg.metrics, trial.values or [], strict=False)),
            "score": trial.values[0] if trial.values else None, "params": trial.params, "point": trial.point,
            "error": trial.error, "groups": files}


def best_rows(layout: Layout, experiment: str, top: int) -> tuple[Search, History, list[dict[str, Any]]]:
    search = require_search(layout, experiment)
    h = read_history(layout, experiment)
    return search, h, [trial_row(layout, search, t) for t in best_trials(search, h, top)]


def search_status(layout: Layout, experiment: str) -> dict[str, Any] | None:
    """What `status` shows of a search (None if the experiment is not one): its
    strategy, counts, generation, the best trial so far, and every trial."""
    search = load_search(layout, experiment)
    if search is None:
        return None
    h = read_history(layout, experiment)
    state = progress(search, h)
    best = state.pop("best")
    return {"strategy": search.cfg.strategy, "metrics": list(search.cfg.metrics),
            "directions": list(search.cfg.directions), **state,
            "best": None if best is None else {"number": best.number, "values": best.values,
                                               "params": best.params, "point": best.point},
            "trial_details": [{"number": t.number, "generation": t.generation, "state": t.state,
                               "values": t.values, "params": t.params, "point": t.point,
                               "budget": t.budget, "error": t.error} for t in h.ordered]}


def status_line(name: str, st: dict[str, Any]) -> str:
    """One line for `status`: the counts, the generation and the best so far."""
    best = st.get("best")
    shown = ""
    if best is not None and best.get("values"):
        params = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        shown = f"; best {best['values'][0]:.4g} (trial {best['number']}: {params})"
    end = " [ended]" if st["finished"] else ""
    stopped = f" [stopped: {st['stopped']}]" if st.get("stopped") else ""
    return (f"search {st['strategy']} on {', '.join(st['metrics'])}: "
            f"{st['complete'] + st['failed'] + st['pruned']}/{st['trials']} trials ended "
            f"({st['complete']} complete, {st['failed']} failed, {st['pruned']} pruned, {st['running']} running), "
            f"generation {st['generation']}{shown}{end}{stopped}")
