"""`orchestrator watch`: a live full-screen view of experiments, workers and runs."""

from __future__ import annotations

import sys

import click

from .. import errors
from ..paths import Layout
from .base import broker_option, cli, cluster_paths, err, out, results_root_option


@cli.command()
@click.argument("experiment", required=False)
@broker_option
@results_root_option
@click.option("--interval", type=click.FloatRange(min=0.1, max=3600), default=1.0, show_default=True,
              metavar="SECONDS", help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (scripts; what a pipe gets anyway).")
def watch(experiment: str | None, broker: str | None, results_root: str | None, interval: float,
          once: bool) -> None:
    """A live view of the cluster in the terminal: per experiment a progress bar and
    ETA; per worker (GPU) the run it trains, its epoch or step and latest metric, GPU
    memory; the last failures with their first error line. It reads Redis and the
    results root (never Flower). Keys: q quits (so does Ctrl-C).

    \b
    Examples:
      orchestrator watch --broker redis://head:6379/0
      orchestrator watch iris_sweep --once
    """
    from ..dispatch.manifest import load_manifest
    from ..views import dashboard
    from .roles import is_roles_experiment, show_watch

    if is_roles_experiment(results_root, experiment):
        show_watch(str(experiment), max(interval, 0.2), once, results_root, broker)
        return
    root, url = cluster_paths(broker, results_root)
    layout = Layout(root)
    if experiment is not None:
        load_manifest(layout, experiment)  # ExperimentNotFound lists the ones there are
    client = dashboard.redis_client(url)
    collector = dashboard.Collector(layout, client, url, experiment)
    import redis
    from rich.console import Console

    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        from ..cluster.registry import redact

        raise errors.EnvironmentProblem(f"cannot reach Redis at {redact(url)}: {exc}") from None
    if once or not (sys.stdin.isatty() and sys.stdout.isatty()):
        snap = dashboard.once(collector, out)
        if snap.error:
            raise errors.EnvironmentProblem(snap.error.replace(", retrying", ""))
        if not once:
            err.print("(not a terminal: printed one frame; `--once` does this without this note)")
        return
    dashboard.watch(collector, Console(highlight=False), interval)
