"""`orchestrator report`: a self-contained HTML report with plots."""

from __future__ import annotations

import os
import webbrowser
from pathlib import Path

import click

from ..errors import EnvironmentProblem
from ..paths import Layout
from .base import cli, out, results_root_option, results_root_path

METRIC_CHOICES = ("accuracy", "macro_f1", "log_loss")  # orchestrator.views.htmlreport.METRICS


def open_in_browser(path: Path) -> bool:
    """Ask the desktop's browser to show `path`; False where there is none (a server)."""
    try:
        return bool(webbrowser.open(path.as_uri()))
    except (webbrowser.Error, OSError):
        return False


@cli.command()
@click.argument("experiment")
@results_root_option
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH", help="HTML file to write [default: <results root>/<experiment>/report.html]. "
                                   "The PNGs also go to <PATH stem>_files/ beside it.")
@click.option("--metric", type=click.Choice(METRIC_CHOICES), default="accuracy", show_default=True,
              help="Validation metric to rank groups by and to plot.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many groups the best-groups table lists.")
@click.option("--open", "open_browser", is_flag=True, help="Open the report in a web browser.")
def report(experiment: str, results_root: str | None, output: Path | None, metric: str, top: int,
           open_browser: bool) -> None:
    """Write an HTML report of an experiment, finished or not: plots of the metric
    against each swept parameter, per-fold scores, confusion matrices of each dataset's
    best group, a timeline of runs per worker (idle gaps show), and the best groups as
    a table.

    \b
    Example:
      orchestrator report iris_sweep --open
    """
    from ..views.htmlreport import write_report
    from .roles import is_roles_experiment, show_report

    if is_roles_experiment(results_root, experiment):  # the evaluators' plot (docs/roles.md)
        show_report(experiment, results_root, os.environ.get("ORCH_BROKER_URL"))
        return
    layout = Layout(results_root_path(results_root))
    try:
        result = write_report(layout, experiment, output, metric=metric, top=top)
    except OSError as exc:
        where = exc.filename or output or "the report"
        raise EnvironmentProblem(f"cannot write {where}: {exc.strerror or exc}") from None
    groups = result.data.groups
    done = sum(g.state == "DONE" for g in groups)
    runs = [f for g in groups for f in g.folds]
    out.print(f"report: {result.html}", markup=False)
    if result.images:
        out.print(f"figures: {len(result.images)} PNG files in {result.images[0].parent}", markup=False)
    tail = "" if done == len(groups) else "; what is unfinished or missing is listed in the report"
    out.print(f"{experiment}: {done}/{len(groups)} groups DONE, "
              f"{sum(f.state == 'DONE' for f in runs)}/{len(runs)} runs DONE{tail}", markup=False)
    if open_browser and not open_in_browser(result.html):
        out.print(f"no web browser found here; open {result.html} yourself", markup=False)
