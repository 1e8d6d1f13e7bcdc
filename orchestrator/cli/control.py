"""Commands that steer experiments on a running cluster: cancel."""

from __future__ import annotations

import os

import click

from .. import errors
from ..paths import Layout
from .base import _results_root, _use_broker, broker_option, cli, out, results_root_option


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
    from redis.exceptions import RedisError

    from ..leases import Leases
    from ..livestate import LiveState
    from ..steering import cancel_experiment, describe

    if not broker:
        raise errors.OrchestratorError(
            "no broker configured: pass --broker redis://HOST:6379/0 or set ORCH_BROKER_URL")
    root = _results_root(results_root)
    _use_broker(broker, root)
    url = os.environ["ORCH_STATE_URL"]
    try:
        counts = cancel_experiment(Layout(root), experiment, Leases.from_url(url), LiveState.from_url(url))
    except RedisError as exc:
        raise errors.EnvironmentProblem(f"cannot reach Redis at {url}: {exc}") from None
    out.print(f"{experiment}: {describe(counts)}")
