"""Commands that steer experiments on a running cluster: cancel, pause, resume."""

from __future__ import annotations

from typing import Any

import click

from ..cluster.endpoints import redis_errors
from ..paths import Layout
from .base import broker_option, cli, cluster_paths, out, results_root_option


@cli.command()
@click.argument("experiment")
@results_root_option
@broker_option
def cancel(experiment: str, results_root: str | None, broker: str | None) -> None:
    """Cancel an experiment: its queued runs are dropped, running ones stop (at their
    next progress report, at the latest before writing), states become CANCELLED.
    Running or submitting the experiment again resumes it.

    \b
    Example:
      orchestrator cancel iris_sweep --broker redis://head:6379/0
    """
    from ..dispatch.steering import cancel_experiment, describe
    from ..livestate import LiveState

    layout, leases, url = _connect(broker, results_root)
    with redis_errors(url):
        counts = cancel_experiment(layout, experiment, leases, LiveState.from_url(url))
    out.print(f"{experiment}: {describe(counts)}")


@cli.command()
@click.argument("experiment")
@click.option("--now", is_flag=True, help="Also hand back the runs training now (they start again on resume).")
@results_root_option
@broker_option
def pause(experiment: str, now: bool, results_root: str | None, broker: str | None) -> None:
    """Stop new runs of an experiment from starting; running ones finish (or, with
    --now, are handed back). `orchestrator resume` lets them go again.

    \b
    Example:
      orchestrator pause iris_sweep --broker redis://head:6379/0
    """
    from ..dispatch.steering import pause_experiment

    layout, leases, url = _connect(broker, results_root)
    with redis_errors(url):
        result = pause_experiment(layout, experiment, leases, now)
    extra = f"; {result['handed_back']} running runs handed back" if now else "; running runs finish"
    out.print(f"{experiment}: paused{extra}")


@cli.command()
@click.argument("experiment")
@results_root_option
@broker_option
def resume(experiment: str, results_root: str | None, broker: str | None) -> None:
    """Let a paused experiment's runs start again.

    \b
    Example:
      orchestrator resume iris_sweep --broker redis://head:6379/0
    """
    from ..dispatch.canvas import unpark
    from ..dispatch.steering import resume_experiment

    layout, leases, url = _connect(broker, results_root)
    with redis_errors(url):
        result = resume_experiment(layout, experiment, leases, unpark)
    out.print(f"{experiment}: resumed; {result['unparked']} waiting runs back on their queues")


def _connect(broker: str | None, results_root: str | None) -> tuple[Layout, Any, str]:
    from ..execution.leases import Leases

    root, url = cluster_paths(broker, results_root)
    return Layout(root), Leases.from_url(url), url
