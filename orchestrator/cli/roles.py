"""`orchestrator roles ...`: experiments of long-lived roles (docs/roles.md).
`pause`, `resume` and `cancel` are the usual commands."""

from __future__ import annotations

import json
import time

import click

from ..cluster.endpoints import redis_errors
from ..paths import Layout
from .base import (
    broker_option,
    cli,
    cluster_paths,
    out,
    results_root_option,
    results_root_path,
    use_broker,
)


@cli.group()
def roles() -> None:
    """Experiments of long-lived roles: actors, a learner, evaluators.

    \b
    Example:
      orchestrator roles submit configs/roles/tictactoe.yaml --broker redis://head:6379/0
      orchestrator roles watch ttt_selfplay
    """


@roles.command("validate")
@click.argument("configs", nargs=-1, required=True, type=click.Path())
def validate_roles(configs: tuple[str, ...]) -> None:
    """Check roles experiment files; every problem at once (exit 2).

    \b
    Example:
      orchestrator roles validate configs/roles/tictactoe.yaml
    """
    from ..errors import ConfigError
    from ..roles.config import load_roles

    problems = []
    for path in configs:
        try:
            exp = load_roles(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        count = sum(r.count for r in exp.roles)
        out.print(f"OK  {path}: experiment {exp.name!r}, {count} role instances "
                  f"({', '.join(f'{r.count} {r.name}' for r in exp.roles)})", markup=False)
    if problems:
        raise ConfigError(problems)


def is_roles_experiment(root: str | None, experiment: str | None) -> bool:
    """Whether `experiment` (under the results root) was submitted as a roles experiment
    (its roles/status.json: one stat, not a read of a manifest that may hold 100,000
    runs): then `status`, `watch` and `report` show its roles."""
    if not experiment:
        return False
    from ..roles.files import RolesFiles

    try:
        return RolesFiles(Layout(results_root_path(root)), experiment).status_path().is_file()
    except Exception:  # noqa: BLE001 (an unsafe name: the usual command reports it)
        return False


def split_roles_configs(configs: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the other configs, the roles experiment files) of a command line."""
    from ..roles.config import is_roles_file

    roles_files = [c for c in configs if is_roles_file(c)]
    return [c for c in configs if c not in roles_files], roles_files


def submit_roles_files(paths: list[str], results_root: str | None, broker: str) -> None:
    import os

    from .. import keys
    from ..errors import ConfigError
    from ..roles.config import load_roles
    from ..roles.submit import submit_roles

    exps, problems = [], []
    for path in paths:
        try:
            exps.append(load_roles(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    root = results_root_path(results_root, writable=True)
    use_broker(broker, root)
    from tasks.roles import send_role

    url = os.environ["ORCH_STATE_URL"]
    for exp in exps:
        with redis_errors(url):
            ids = submit_roles(exp, Layout(root), keys.client(url), send_role)
        out.print(f"{exp.name}: {len(ids)} role instances started", markup=False)


@roles.command("submit")
@click.argument("config", type=click.Path())
@results_root_option
@broker_option
def submit_roles_cmd(config: str, results_root: str | None, broker: str | None) -> None:
    """Start every role instance of a roles experiment on a running cluster.

    \b
    Example:
      ORCH_BROKER_URL=redis://head:6379/0 orchestrator roles submit configs/roles/tictactoe.yaml
    """
    from .. import errors

    if not broker:
        raise errors.OrchestratorError("no broker configured: pass --broker redis://HOST:6379/0 or set ORCH_BROKER_URL")
    submit_roles_files([config], results_root, broker)


def _status(experiment: str, results_root: str | None, broker: str | None) -> tuple[dict, Layout]:  # type: ignore[type-arg]
    from .. import keys
    from ..views.roles import roles_status

    root, url = cluster_paths(broker, results_root)
    layout = Layout(root)
    with redis_errors(url):
        return roles_status(keys.client(url, "command"), layout, experiment), layout


@roles.command("status")
@click.argument("experiment")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@results_root_option
@broker_option
def status_roles(experiment: str, as_json: bool, results_root: str | None, broker: str | None) -> None:
    """Role instances (host, state, heartbeat), current version, throughput, scores.

    \b
    Example:
      orchestrator roles status ttt_selfplay --json
    """
    show_status(experiment, as_json, results_root, broker)


def show_status(experiment: str, as_json: bool, results_root: str | None, broker: str | None) -> None:
    from ..views.roles import status_lines

    data, _ = _status(experiment, results_root, broker)
    if as_json:
        out.file.write(json.dumps(data, indent=2) + "\n")
    else:
        out.print("\n".join(status_lines(data)), markup=False)


@roles.command("watch")
@click.argument("experiment")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.2))
@click.option("--once", is_flag=True, help="Print one screen and exit.")
@results_root_option
@broker_option
def watch_roles(experiment: str, interval: float, once: bool, results_root: str | None, broker: str | None) -> None:
    """Redraw the status of a roles experiment until it ends (Ctrl-C stops watching).

    \b
    Example:
      orchestrator roles watch ttt_selfplay
    """
    show_watch(experiment, interval, once, results_root, broker)


def show_watch(experiment: str, interval: float, once: bool, results_root: str | None, broker: str | None) -> None:
    from ..views.roles import status_lines

    once = once or not out.is_terminal  # into a pipe: one frame, as `watch` does
    while True:
        data, _ = _status(experiment, results_root, broker)
        if not once:
            out.clear()
        out.print("\n".join(status_lines(data)), markup=False)
        if once or data.get("status") in ("DONE", "CANCELLED", "FAILED"):
            return
        time.sleep(interval)


@roles.command("report")
@click.argument("experiment")
@results_root_option
@broker_option
def report_roles(experiment: str, results_root: str | None, broker: str | None) -> None:
    """Write the evaluators' win-rate plot (roles/winrate.png) and print the scores.

    \b
    Example:
      orchestrator roles report ttt_selfplay
    """
    show_report(experiment, results_root, broker)


def show_report(experiment: str, results_root: str | None, broker: str | None) -> None:
    from ..roles.files import RolesFiles
    from ..views.roles import plot_scores, status_lines

    data, layout = _status(experiment, results_root, broker)
    path = plot_scores(data, RolesFiles(layout, experiment).plot_path())
    out.print("\n".join(status_lines(data)), markup=False)
    out.print(f"plot: {path}" if path else "no evaluations yet: no plot", markup=False)
