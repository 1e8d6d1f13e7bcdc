"""Commands that read experiments and results: validate, plan, status, logs."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.table import Table

from .. import keys
from ..config import load_experiments
from ..errors import OrchestratorError
from ..expand import expand
from ..paths import Layout, read_json
from ..plan import plan_rows, totals
from ..report import InFlight
from ..spec import RunSpec
from .base import cli, err, out, plans_of, results_root_option, results_root_path, use_broker

# Above this many characters, `--json` on a terminal is printed plain, not coloured:
# rich's JSON highlighter costs ~1.3 s a megabyte (status --json of 10,000 runs: 8.6 MB).
JSON_HIGHLIGHT_MAX = 1 << 20


def print_json(data: Any) -> None:
    """`data` as JSON indented by 2, as rich's print_json writes it; coloured only on a
    terminal and when small. Into a pipe rich would add nothing but its cost (status
    --json of 100,000 runs: 150 of its 204 s)."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    if out.is_terminal and len(text) <= JSON_HIGHLIGHT_MAX:
        out.print_json(text)
    else:
        out.file.write(text + "\n")
        out.file.flush()


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path())
def validate(configs: tuple[str, ...]) -> None:
    """Check experiment files and report every problem at once.

    \b
    Example:
      orchestrator validate configs/          # every *.yaml in the folder
    """
    for exp in load_experiments(list(configs)):
        runs = expand(exp)
        n_groups = len({r.group_id for r in runs})
        out.print(f"OK  {exp.file}: experiment {exp.name!r}, {len(runs)} runs in {n_groups} groups",
                  markup=False)


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path())
@results_root_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(configs: tuple[str, ...], results_root: str | None, as_json: bool) -> None:
    """Show the runs an experiment expands to, and which are already DONE.

    \b
    Example:
      orchestrator plan configs/iris_sweep.yaml --json | jq '.[0].totals'
    """
    layout = Layout(results_root_path(results_root))
    exps = load_experiments(list(configs))
    plans = plans_of(exps, layout)
    if as_json:
        data = [{"experiment": name, "totals": totals(p), "runs": plan_rows(layout, p),
                 "paused": read_json(layout.paused_marker(name))} for name, p in plans.items()]
        print_json(data)
        return
    for name, p in plans.items():
        table = Table(title=f"experiment {name}", title_justify="left")
        for col in ("run", "run_id", "queue", "state"):
            table.add_column(col, overflow="fold")
        for row in plan_rows(layout, p):
            style = {"DONE": "green", "FAILED": "red", "IN_PROGRESS": "yellow"}.get(row["state"])
            table.add_row(row["name"], row["run_id"], row["queue"], row["state"], style=style)
        out.print(table)
        t = totals(p)
        out.print(f"{t['runs']} runs in {t['groups']} groups: {t['done']} DONE, {t['to_run']} to run, "
                  f"{t['groups_to_finalize']} groups to finalize")
        if read_json(layout.paused_marker(name)) is not None:
            out.print(f"{name} is PAUSED: its runs do not start until `orchestrator resume {name}`")



@cli.command()
@click.argument("experiment", required=False)
@results_root_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, with every output file's path.")
@click.option("--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
              help="Also ask this cluster's Redis about runs on workers without the results root "
              "(--return-results): running, failed, or RETURNED (outputs not yet written) [env ORCH_BROKER_URL].")
def status(experiment: str | None, results_root: str | None, as_json: bool, broker: str | None) -> None:
    """Per experiment and group: counts by state; per fold: worker, attempt, elapsed.

    \b
    Examples:
      orchestrator status
      orchestrator status iris_kfold --json | jq '.group_details[0].folds[0].files'
    """
    from ..manifest import experiments
    from ..report import experiment_status

    layout = Layout(results_root_path(results_root))
    names = [experiment] if experiment else experiments(layout)
    lookup = _in_flight(broker)
    data = [experiment_status(layout, n, with_files=as_json, in_flight=lookup) for n in names]
    if as_json:
        print_json(data if experiment is None else data[0])
        return
    if not names:
        out.print(f"no experiments under {layout.root}")
        return
    for st in data:
        paused = " [yellow]PAUSED[/]" if st["paused"] else ""
        out.print(f"[bold]{st['experiment']}[/]{paused}: groups {st['groups']}, runs {st['runs']}")
        if experiment is None:
            continue
        table = Table(show_edge=False)
        for col in ("group", "state", "fold", "run state", "worker", "attempt", "elapsed", "error"):
            table.add_column(col, overflow="fold")
        for g in st["group_details"]:
            for i, f in enumerate(g["folds"]):
                table.add_row(g["name"] if i == 0 else "", g["state"] if i == 0 else "",
                              str(f["fold"]), f["state"], f["worker"] or "-", str(f["attempt"] or "-"),
                              f"{f['elapsed']:.1f}s" if f["elapsed"] is not None else "-",
                              (f["error"] or "")[:60])
        out.print(table)



def _in_flight(broker: str | None) -> InFlight | None:
    """The lookup of return-mode folds in the cluster's Redis for `status`, or None
    without a broker. Redis unreachable: said once on stderr, the files alone count."""
    if not broker:
        return None
    import redis as redis_lib

    from ..registry import redact, state_url
    from ..returns import Returns
    from .base import check_redis_url

    url = check_redis_url(state_url(broker), "broker URL (--broker / ORCH_BROKER_URL) or ORCH_STATE_URL")
    returns = Returns(keys.client(url, "command"))
    unreachable: list[str] = []

    def lookup(specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
        if unreachable:
            return {}
        try:
            return returns.records(specs)
        except redis_lib.RedisError as exc:
            unreachable.append(str(exc))
            err.print(f"note: cannot reach {redact(broker)} ({exc}); showing the status files only",
                      markup=False)
            return {}

    return lookup


@cli.command()
@click.argument("run")
@click.option("--attempt", type=int, default=None, help="Only this attempt (default: every attempt).")
@results_root_option
@click.option("--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
              help="Also look in this cluster's Redis, for runs trained on hosts without the shared results root.")
def logs(run: str, attempt: int | None, results_root: str | None, broker: str | None) -> None:
    """Show a run's stdout and stderr, attempt by attempt.

    RUN is a run name as `status` shows it (exp/dataset/point/seed=S/fold=F) or its
    run_id (a prefix of 6 or more characters will do).

    \b
    Example:
      orchestrator logs iris_kfold/iris/hidden=64,lr=0.01/seed=0/fold=2
    """

    from ..runlogs import attempt_logs, find_run

    layout = Layout(results_root_path(results_root))
    spec = find_run(layout, run)
    client = None
    if broker:
        use_broker(broker, layout.root)
        client = keys.client(os.environ["ORCH_STATE_URL"], "command")
    found = attempt_logs(layout, spec, client)
    if attempt is not None:
        found = {k: v for k, v in found.items() if k == attempt}
    if not found:
        where = f"under {layout.logs_dir(spec)}" + (" or in Redis" if client is not None else "")
        raise OrchestratorError(f"no log of {spec.name}" + (f" attempt {attempt}" if attempt else "")
                                + f" {where}: it has not started yet, or ran elsewhere "
                                "(pass --broker to look in Redis)")
    for number, (source, data) in found.items():
        err.print(f"==> {spec.name} attempt {number} ({source}) <==", markup=False)
        sys.stdout.write(data.decode(errors="replace"))
        if data and not data.endswith(b"\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
