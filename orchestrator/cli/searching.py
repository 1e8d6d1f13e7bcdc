"""`orchestrator search best`, and what `run` and `submit` do for a search."""

from __future__ import annotations

from typing import Any

import click

from .. import errors
from ..experiment.config import Experiment
from ..paths import Layout
from .base import cli, err, out, results_root_option, results_root_path


def save_searches(exps: list[Experiment], layout: Layout) -> list[str]:
    """Record each search's config (refused, exit 2, if it changed what its trials mean);
    returns the names of the searches that have not ended."""
    if not exps:
        return []
    from ..search.engine import progress, read_history, save_search, search_of

    todo = []
    for exp in exps:
        search = search_of(exp)
        save_search(layout, search)
        if not progress(search, read_history(layout, exp.name))["finished"]:
            todo.append(exp.name)
    return todo


def start_searches(names: list[str]) -> None:
    """A step of each search on the control queue, publishing again what is in flight
    (a submission: the broker may have lost it). Optuna stays out of this process."""
    from tasks import app
    from tasks.search import SEARCH_STEP

    for name in names:
        app.send_task(SEARCH_STEP, args=(name, True), queue="control")
        err.print(f"submitted search {name}")


def wait_searches_or_fail(layout: Layout, names: list[str], check: Any = None) -> None:
    """Wait for the searches to end (orchestrator.views.search.wait_searches)."""
    from ..views.search import wait_searches

    if names:
        wait_searches(layout, names, check)


def searches_in_flight(layout: Layout, names: list[str]) -> dict[str, Any]:
    """Per search, the plans of its trials in flight (what an interrupted `run` cancels)."""
    from ..search.engine import load_search, read_history, trial_plans

    found = {}
    for name in names:
        search = load_search(layout, name)
        if search is not None:
            running = [t for t in read_history(layout, name).ordered if t.state == "RUNNING"]
            found[name] = trial_plans(layout, search, running)
    return found


def search_summary(layout: Layout, names: list[str], top: int = 5) -> int:
    """The best trials of each search; the exit code (1 if one stopped on failures)."""
    from ..search.engine import progress
    from ..views.search import best_rows

    code = errors.EXIT_OK
    for name in names:
        search, h, rows = best_rows(layout, name, top)
        state = progress(search, h)
        _print_rows(name, search.cfg.metrics, rows)
        if state["stopped"]:
            err.print(f"[red]search {name} stopped[/]: {state['stopped']}")
            code = errors.EXIT_RUNS_FAILED
        failed = [t for t in h.ordered if t.state == "FAILED"]
        for t in failed[:5]:
            err.print(f"[red]FAILED[/] trial {t.number} ({t.point}): {t.error}", markup=True)
    return code


def _print_rows(name: str, metrics: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=f"{name}: best {len(rows)} trials", title_justify="left")
    for col in ("trial", "gen", *metrics, "params"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["number"]), str(r["generation"]),
                      *(f"{r['values'].get(m, float('nan')):.4f}" for m in metrics),
                      ", ".join(f"{k}={v}" for k, v in r["params"].items()))
    out.print(table)


@cli.group()
def search() -> None:
    """Searches (experiments with a `search:` block): their best trials.

    \b
    Example:
      orchestrator search best digits_nas --top 5
    """


@search.command()
@click.argument("experiment")
@results_root_option
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 100000), help="How many trials.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, with each trial's files.")
def best(experiment: str, results_root: str | None, top: int, as_json: bool) -> None:
    """The best trials of a search: parameters, score and files.

    \b
    Example:
      orchestrator search best digits_nas --top 3 --json | jq '.trials[0].params'
    """
    from ..search.engine import progress
    from ..views.search import best_rows
    from .experiments import print_json

    layout = Layout(results_root_path(results_root))
    search_, h, rows = best_rows(layout, experiment, top)
    if as_json:
        state = progress(search_, h)
        best_ = state.pop("best")
        print_json({"experiment": experiment, "strategy": search_.cfg.strategy,
                    "metrics": list(search_.cfg.metrics), "directions": list(search_.cfg.directions),
                    "progress": {**state, "best_trial": None if best_ is None else best_.number},
                    "trials": rows})
        return
    _print_rows(experiment, search_.cfg.metrics, rows)
