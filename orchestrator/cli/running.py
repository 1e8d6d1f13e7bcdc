"""Commands that execute experiments: run (local mode or a given broker) and submit."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

import click
from rich.markup import escape
from rich.table import Table

from .. import errors
from ..errors import EnvironmentProblem
from ..experiment.config import Experiment, load_experiments
from ..experiment.plan import GroupPlan, totals
from ..paths import Layout
from .base import (
    broker_option,
    cli,
    err,
    out,
    plans_of,
    results_root_option,
    results_root_path,
    use_broker,
)
from .searching import (
    save_searches,
    search_summary,
    searches_in_flight,
    start_searches,
    wait_searches_or_fail,
)


def _submit(exps: list[Experiment], plans: dict[str, list[GroupPlan]], layout: Layout,
            searches: list[str] | None = None) -> Any:
    """Publish every experiment's plan, and a step of each search; returns the LiveState used."""
    from ..dispatch.submission import submit_experiments

    def report(exp: Experiment, published: dict[str, int]) -> None:
        err.print(f"submitted {exp.name}: {published['runs']} runs in {published['groups']} groups"
                  + (f", {published['finalize_only']} groups to finalize" if published["finalize_only"] else ""))

    live = submit_experiments(exps, plans, layout, report)
    if searches:
        from celery.exceptions import OperationalError
        from kombu.exceptions import KombuError
        from redis.exceptions import RedisError

        try:
            start_searches(searches)
        except (OperationalError, KombuError, RedisError) as exc:
            raise EnvironmentProblem(f"cannot reach the broker at {os.environ['ORCH_BROKER_URL']}: {exc}") from None
    return live


def _summary(exps: list[Experiment], layout: Layout) -> int:
    """Print the result table; return the exit code (1 if any group FAILED)."""
    from ..views.overview import group_summaries

    failed_any = False
    for exp in exps:
        groups = group_summaries(layout, exp.name)
        table = Table(title=f"{exp.name}: {len(groups)} groups", title_justify="left")
        for col in ("group", "state", "folds", "oof acc", "ensemble acc"):
            table.add_column(col, justify="right" if "acc" in col or col == "folds" else "left",
                             overflow="fold")

        def acc(g: dict[str, Any], key: str) -> float:
            return float(g["metrics"].get(key, {}).get("accuracy", -1))

        failed = [g for g in groups if g["state"] != "DONE"]
        best = sorted((g for g in groups if g["state"] == "DONE"), key=lambda g: -acc(g, "oof"))
        shown = failed[:20] + best[: max(0, 20 - len(failed[:20]))]
        for g in shown:
            table.add_row(g["name"], g["state"], f"{g['done']}/{g['folds']}",
                          f"{acc(g, 'oof'):.3f}" if acc(g, "oof") >= 0 else "-",
                          f"{acc(g, 'ensemble_holdout'):.3f}" if acc(g, "ensemble_holdout") >= 0 else "-",
                          style="red" if g["state"] == "FAILED" else None)
        out.print(table)
        if len(shown) < len(groups):
            out.print(f"({len(groups) - len(shown)} more groups: `orchestrator status {exp.name}`)")
        for g in failed:
            for fold, error in g["failed"].items():
                where = f"fold={fold}" if fold.isdigit() else fold
                err.print(f"[red]{g['state']}[/] {escape(g['name'])}/{where}: {escape(str(error))}")
        failed_any = failed_any or bool(failed)
        out.print(f"results: {layout.final_results(exp.name)}")
    return errors.EXIT_RUNS_FAILED if failed_any else errors.EXIT_OK


def _on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path())
@results_root_option
@broker_option
@click.option("--workers", "n_workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="CPU workers to start when no GPU is found.")
@click.option("--loglevel", default="WARNING", show_default=True, help="Celery log level of local workers.")
def run(configs: tuple[str, ...], results_root: str | None, broker: str | None, n_workers: int,
        loglevel: str) -> None:
    """Run experiments to the end and exit non-zero if any run FAILED.

    Without a broker it starts a private redis-server, one worker per GPU (or --workers
    CPU workers) and a control worker, and stops them all when done or on Ctrl-C.
    Runs already DONE under the results root are skipped.

    \b
    Examples:
      orchestrator run configs/iris_kfold.yaml
      orchestrator run configs/ --workers 4
      orchestrator run configs/iris_sweep.yaml --broker redis://head:6379/0
    """
    from ..cluster.local import LocalCluster
    from ..views.progress import Tracked, wait

    exps = load_experiments(list(configs))
    root = results_root_path(results_root, writable=True)
    layout = Layout(root)
    searches = [e for e in exps if e.search is not None]
    exps = [e for e in exps if e.search is None]
    search_names = [e.name for e in searches]
    todo_searches = save_searches(searches, layout)
    plans = plans_of(exps, layout)
    if all(t["groups_to_finalize"] == 0 for t in map(totals, plans.values())) and not todo_searches:
        from ..dispatch.manifest import write_manifest

        for exp in exps:  # the summary below (and `status`) describe this submission
            write_manifest(layout, exp, plans[exp.name])
        err.print("nothing to do: every run and group is already DONE"
                  + (" and every search has ended" if searches else ""))
        sys.exit(max(_summary(exps, layout), search_summary(layout, search_names)))
    tracked = [Tracked(e.name, plans[e.name]) for e in exps]
    signal.signal(signal.SIGTERM, _on_sigterm)
    cluster = None
    try:
        if broker:
            use_broker(broker, root)
        else:
            from ..cluster.gpu import detect

            gpus = [g.index for g in detect()]
            cpu_runs = (any(s.queue == "cpu" for ps in plans.values() for p in ps for s in p.todo)
                        or any(e.resources.gpus <= 0 for e in searches))
            used = sorted({s.trainer for ps in plans.values() for p in ps for s in p.todo}
                          | {e.trainer.name for e in searches})
            cluster = LocalCluster(results_root=root, cpu_workers=n_workers, gpus=gpus,
                                   cpu_runs=cpu_runs, loglevel=loglevel, preload=used)
            url = cluster.start()
            use_broker(url, root, private=True)
            kinds = [f"{len(gpus)} GPU workers"] if gpus else []
            if not gpus or cpu_runs:
                kinds.append(f"{n_workers} CPU workers")
            err.print(f"local mode: redis at {url}, {', '.join(kinds)}, 1 control worker")
        live = _submit(exps, plans, layout, todo_searches)

        def check() -> None:
            if cluster is not None and (dead := cluster.dead()):
                name = dead[0]
                raise EnvironmentProblem(f"local {name} process exited unexpectedly; its log ends:\n"
                                         f"{cluster.log_tail(name)}")

        if tracked:
            wait(live, tracked, err, check=check)
        wait_searches_or_fail(layout, todo_searches, check)
        code = max(_summary(exps, layout), search_summary(layout, search_names))  # results first, then the stop
        if cluster is not None:
            cluster.stop(finished=True)  # every group final, every search complete: nothing in flight
            cluster = None
    except KeyboardInterrupt:
        err.print("interrupted: stopping workers")
        if cluster is not None:
            cluster.stop()
            cluster = None
            _cancel_unfinished(layout, {**plans, **searches_in_flight(layout, todo_searches)},
                               "interrupted (Ctrl-C)")
        sys.exit(errors.EXIT_INTERRUPTED)
    except EnvironmentProblem as exc:
        if cluster is not None:  # a local worker or Redis died: nothing will finish now
            cluster.stop()
            cluster = None
            _cancel_unfinished(layout, {**plans, **searches_in_flight(layout, todo_searches)},
                               f"local cluster failed: {str(exc).splitlines()[0]}")
        raise
    finally:
        if cluster is not None:
            cluster.stop()
    sys.exit(code)


def _cancel_unfinished(layout: Layout, plans: dict[str, list[GroupPlan]], why: str) -> None:
    """After local workers were stopped: runs that did not finish are CANCELLED."""
    from ..collect.status import Status, read_fold_status, write_fold_status

    for group_plans in plans.values():
        for p in group_plans:
            for spec in p.todo:
                record = read_fold_status(layout, spec)
                if record is None or record.get("status") in ("PENDING", "IN_PROGRESS"):
                    write_fold_status(layout, spec, Status.CANCELLED, error=why)


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path())
@results_root_option
@broker_option
@click.option("--wait", "wait_", is_flag=True, help="Wait until every group is DONE or FAILED.")
def submit(configs: tuple[str, ...], results_root: str | None, broker: str | None, wait_: bool) -> None:
    """Enqueue experiments on a running cluster; print their ids (names).

    \b
    Example:
      ORCH_BROKER_URL=redis://head:6379/0 orchestrator submit configs/iris_sweep.yaml --wait
    """
    from ..views.progress import Tracked, wait

    if not broker:
        raise errors.OrchestratorError(
            "no broker configured: pass --broker redis://HOST:6379/0 or set ORCH_BROKER_URL "
            "(or use `orchestrator run` to start a local cluster)")
    from .roles import split_roles_configs, submit_roles_files

    others, roles_files = split_roles_configs(configs)
    if roles_files:  # `roles:` experiments start their role tasks (docs/roles.md)
        submit_roles_files(roles_files, results_root, broker)
        if not others:
            return
    exps = load_experiments(others)
    root = results_root_path(results_root, writable=True)
    use_broker(broker, root)
    layout = Layout(root)
    searches = [e for e in exps if e.search is not None]
    exps = [e for e in exps if e.search is None]
    todo_searches = save_searches(searches, layout)
    plans = plans_of(exps, layout)
    live = _submit(exps, plans, layout, todo_searches)
    for exp in exps + searches:
        out.print(exp.name)
    if wait_:
        try:
            if exps:
                wait(live, [Tracked(e.name, plans[e.name]) for e in exps], err)
            wait_searches_or_fail(layout, todo_searches)
        except KeyboardInterrupt:
            sys.exit(errors.EXIT_INTERRUPTED)
        sys.exit(max(_summary(exps, layout), search_summary(layout, [e.name for e in searches])))

