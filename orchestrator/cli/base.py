"""What every subcommand shares: the click group, consoles, results root and broker checks."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console

from .. import errors
from ..cluster.endpoints import check_redis_url, results_root_path, use_broker
from ..experiment.config import Experiment
from ..experiment.expand import expand
from ..experiment.plan import GroupPlan, make_plan
from ..paths import Layout

__all__ = ["check_redis_url", "cli", "cluster_paths", "err", "out", "plans_of", "results_root_path",
           "use_broker"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def plans_of(exps: list[Experiment], layout: Layout) -> dict[str, list[GroupPlan]]:
    return {e.name: make_plan(layout, expand(e)) for e in exps}


def cluster_paths(broker: str | None, results_root: str | None, writable: bool = False) -> tuple[Path, str]:
    """For commands that work on a running cluster: the results root and the state
    Redis URL, after the broker URL was checked; a usage error without a broker."""
    if not broker:
        raise errors.OrchestratorError(
            "no broker configured: pass --broker redis://HOST:6379/0 or set ORCH_BROKER_URL")
    root = results_root_path(results_root, writable=writable)
    use_broker(broker, root)
    return root, os.environ["ORCH_STATE_URL"]


results_root_option = click.option(
    "--results-root", envvar="ORCH_RESULTS_ROOT", default=None, metavar="DIR",
    help="Root folder of all results [env ORCH_RESULTS_ROOT; default ./results].")
broker_option = click.option(
    "--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
    help="Redis URL of a running cluster [env ORCH_BROKER_URL]. Without it, `run` starts a private one.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gpu-orchestrator")
def cli() -> None:
    """Run YAML-described training experiments on Celery workers, one per GPU.

    \b
    Quick start (starts Redis and workers, runs, stops them):
      orchestrator run configs/iris_kfold.yaml
    """

