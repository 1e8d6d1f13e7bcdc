"""`orchestrator search best`, and what `run` and `submit` do for a search."""

from __future__ import annotations

from typing import Any

import click

from .. import errors
from ..paths import Layout
from ..search.client import best_report
from ..search.client import save_searches as save_searches  # (re-exported: `run`, `submit`)
from ..search.client import start_searches as start
from .base import cli, err, out, results_root_option, results_root_path


def start_searches(names: list[str]) -> None:
    """A step of each search on the control queue (orchestrator.search.client); says so."""
    start(names)
    for name in names:
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
    from ..views.search import best_rows
    from .experiments import print_json

    layout = Layout(results_root_path(results_root))
    if as_json:
        print_json(best_report(layout, experiment, top))
        return
    search_, _, rows = best_rows(layout, experiment, top)
    _print_rows(experiment, search_.cfg.metrics, rows)
