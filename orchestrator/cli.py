"""The `orchestrator` command: each subcommand parses, calls one library function, prints.

Errors a user can cause end in a one-paragraph message and a documented exit code
(orchestrator.errors), never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import errors
from .config import Experiment, load_experiments
from .errors import EnvironmentProblem, OrchestratorError
from .expand import expand
from .paths import Layout
from .plan import GroupPlan, make_plan, plan_rows, totals

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _results_root(value: str | None, writable: bool = False) -> Path:
    """The results root; for commands that write, checked to be a writable folder."""
    root = Path(value or os.environ.get("ORCH_RESULTS_ROOT", "results")).resolve()
    if writable:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise EnvironmentProblem(f"results root {root} is not a writable folder: "
                                     f"{exc.strerror or exc}") from None
    return root


def _check_redis_url(url: str, what: str) -> str:
    """A Redis URL redis-py can use, or a usage error naming where it came from."""
    from redis.connection import parse_url

    problem = ""
    from urllib.parse import urlsplit

    db = urlsplit(url).path.strip("/")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        problem = "it must start with redis://, rediss:// or unix://"
    elif url.startswith("redis") and db and not db.isdigit():
        problem = f"the database after the last '/' must be a number, got {db!r}"
    else:
        try:
            parse_url(url)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        raise errors.OrchestratorError(
            f"{what} {url!r} is not a usable Redis URL: {problem} "
            "(expected redis://[:password@]host:port/db)")
    return url


def _use_broker(url: str, results_root: Path, private: bool = False) -> None:
    """Point this process (and `tasks`, imported later) at a broker and results root.

    A private (local-mode) Redis is also the result backend and the live state, whatever
    the environment says: its workers were started that way, and polling another Redis
    would wait forever.
    """
    if not private:
        _check_redis_url(url, "broker URL (--broker / ORCH_BROKER_URL)")
        for name in ("ORCH_RESULT_BACKEND", "ORCH_STATE_URL"):
            if os.environ.get(name):
                _check_redis_url(os.environ[name], name)
    os.environ["ORCH_BROKER_URL"] = url
    if private:
        os.environ["ORCH_RESULT_BACKEND"] = os.environ["ORCH_STATE_URL"] = url
    os.environ.setdefault("ORCH_RESULT_BACKEND", url)
    os.environ.setdefault("ORCH_STATE_URL", os.environ["ORCH_RESULT_BACKEND"])
    os.environ["ORCH_RESULTS_ROOT"] = str(results_root)


def _plans(exps: list[Experiment], layout: Layout) -> dict[str, list[GroupPlan]]:
    return {e.name: make_plan(layout, expand(e)) for e in exps}


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
    layout = Layout(_results_root(results_root))
    exps = load_experiments(list(configs))
    plans = _plans(exps, layout)
    if as_json:
        data = [{"experiment": name, "totals": totals(p), "runs": plan_rows(layout, p)}
                for name, p in plans.items()]
        out.print_json(json.dumps(data))
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


def _submit(exps: list[Experiment], plans: dict[str, list[GroupPlan]], layout: Layout) -> Any:
    """Publish every experiment's plan; returns the LiveState used."""
    from celery.exceptions import OperationalError
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import RedisError

    import celeryconfig  # noqa: F401  (Celery loads it lazily: report a bad ORCH_* value first)

    from .canvas import check_connections, submit
    from .livestate import LiveState

    live = LiveState.from_url(os.environ.get("ORCH_STATE_URL", os.environ["ORCH_BROKER_URL"]))
    try:
        check_connections(live)
        for exp in exps:
            published = submit(exp, plans[exp.name], layout, live)
            err.print(f"submitted {exp.name}: {published['runs']} runs in {published['groups']} groups"
                      + (f", {published['finalize_only']} groups to finalize" if published["finalize_only"] else ""))
    except (OperationalError, KombuOperationalError, RedisError) as exc:
        raise EnvironmentProblem(f"cannot reach the broker at {os.environ['ORCH_BROKER_URL']}: {exc}") from None
    return live


def _summary(exps: list[Experiment], layout: Layout) -> int:
    """Print the result table; return the exit code (1 if any group FAILED)."""
    from .report import group_summaries

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
                err.print(f"[red]FAILED[/] {escape(g['name'])}/{where}: {escape(str(error))}")
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
    from .local import LocalCluster
    from .progress import Tracked, wait

    exps = load_experiments(list(configs))
    root = _results_root(results_root, writable=True)
    layout = Layout(root)
    plans = _plans(exps, layout)
    if all(t["groups_to_finalize"] == 0 for t in map(totals, plans.values())):
        from .manifest import write_manifest

        for exp in exps:  # the summary below (and `status`) describe this submission
            write_manifest(layout, exp, plans[exp.name])
        err.print("nothing to do: every run and group is already DONE")
        sys.exit(_summary(exps, layout))
    tracked = [Tracked(e.name, plans[e.name]) for e in exps]
    signal.signal(signal.SIGTERM, _on_sigterm)
    cluster = None
    try:
        if broker:
            _use_broker(broker, root)
        else:
            from .gpu import detect

            gpus = [g.index for g in detect()]
            cpu_runs = any(s.queue == "cpu" for ps in plans.values() for p in ps for s in p.todo)
            cluster = LocalCluster(results_root=root, cpu_workers=n_workers, gpus=gpus,
                                   cpu_runs=cpu_runs, loglevel=loglevel)
            url = cluster.start()
            _use_broker(url, root, private=True)
            kinds = [f"{len(gpus)} GPU workers"] if gpus else []
            if not gpus or cpu_runs:
                kinds.append(f"{n_workers} CPU workers")
            err.print(f"local mode: redis at {url}, {', '.join(kinds)}, 1 control worker")
        live = _submit(exps, plans, layout)

        def check() -> None:
            if cluster is not None and (dead := cluster.dead()):
                name = dead[0]
                raise EnvironmentProblem(f"local {name} process exited unexpectedly; its log ends:\n"
                                         f"{cluster.log_tail(name)}")

        wait(live, tracked, err, check=check)
        code = _summary(exps, layout)  # results first; stopping the workers takes a moment
    except KeyboardInterrupt:
        err.print("interrupted: stopping workers")
        if cluster is not None:
            cluster.stop()
            cluster = None
            _cancel_unfinished(layout, plans, "interrupted (Ctrl-C)")
        sys.exit(errors.EXIT_INTERRUPTED)
    except EnvironmentProblem as exc:
        if cluster is not None:  # a local worker or Redis died: nothing will finish now
            cluster.stop()
            cluster = None
            _cancel_unfinished(layout, plans, f"local cluster failed: {str(exc).splitlines()[0]}")
        raise
    finally:
        if cluster is not None:
            cluster.stop()
    sys.exit(code)


def _cancel_unfinished(layout: Layout, plans: dict[str, list[GroupPlan]], why: str) -> None:
    """After local workers were stopped: runs that did not finish are CANCELLED."""
    from .status import Status, read_fold_status, write_fold_status

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
    from .progress import Tracked, wait

    if not broker:
        raise errors.OrchestratorError(
            "no broker configured: pass --broker redis://HOST:6379/0 or set ORCH_BROKER_URL "
            "(or use `orchestrator run` to start a local cluster)")
    exps = load_experiments(list(configs))
    root = _results_root(results_root, writable=True)
    _use_broker(broker, root)
    layout = Layout(root)
    plans = _plans(exps, layout)
    live = _submit(exps, plans, layout)
    for exp in exps:
        out.print(exp.name)
    if wait_:
        try:
            wait(live, [Tracked(e.name, plans[e.name]) for e in exps], err)
        except KeyboardInterrupt:
            sys.exit(errors.EXIT_INTERRUPTED)
        sys.exit(_summary(exps, layout))


@cli.command()
@click.argument("experiment", required=False)
@results_root_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, with every output file's path.")
def status(experiment: str | None, results_root: str | None, as_json: bool) -> None:
    """Per experiment and group: counts by state; per fold: worker, attempt, elapsed.

    \b
    Examples:
      orchestrator status
      orchestrator status iris_kfold --json | jq '.group_details[0].folds[0].files'
    """
    from .manifest import experiments
    from .report import experiment_status

    layout = Layout(_results_root(results_root))
    names = [experiment] if experiment else experiments(layout)
    data = [experiment_status(layout, n, with_files=as_json) for n in names]
    if as_json:
        out.print_json(json.dumps(data if experiment is None else data[0]))
        return
    if not names:
        out.print(f"no experiments under {layout.root}")
        return
    for st in data:
        out.print(f"[bold]{st['experiment']}[/]: groups {st['groups']}, runs {st['runs']}")
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


@cli.command()
@click.option("--gpu", "gpu", type=int, default=None, metavar="N", help="Train on GPU N (sets CUDA_VISIBLE_DEVICES).")
@click.option("--cpu", "cpu", is_flag=True, help="Train on the CPU (queue `cpu`).")
@click.option("--accept-gpu-runs", is_flag=True, help="With --cpu: also take runs from the `gpu` queue (machines without GPUs).")
@click.option("--control", "control", is_flag=True, help="Consume the `control` queue (chord callbacks).")
@click.option("--name", default=None, help="Celery node name [default gpuN@%h, cpu@%h, control@%h].")
@click.option("--concurrency", default=None, type=int, help="Processes (only with --control alone; training is 1 per device).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(gpu: int | None, cpu: bool, accept_gpu_runs: bool, control: bool, name: str | None,
           concurrency: int | None, loglevel: str) -> None:
    """Start one Celery worker bound to one GPU, the CPU, and/or the control queue.

    \b
    Examples:
      orchestrator worker --gpu 0            # queues gpu.<host>.0 and gpu
      orchestrator worker --cpu --control    # a laptop: CPU runs and callbacks
    It runs `celery -A tasks worker` with this project's celeryconfig.py.
    """
    if sum(x is not None and x is not False for x in (gpu, cpu or None)) == 0 and not control:
        raise errors.OrchestratorError("say what to consume: --gpu N, --cpu and/or --control")
    if gpu is not None and cpu:
        raise errors.OrchestratorError("--gpu and --cpu exclude each other: one worker per device")
    host = socket.gethostname().split(".")[0]
    queues: list[str] = []
    env = dict(os.environ)
    if gpu is not None:
        queues += [f"gpu.{host}.{gpu}", "gpu"]
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), ORCH_DEVICE="cuda", ORCH_GPU=str(gpu),
                   ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
        default_name = f"gpu{gpu}@%h"
    elif cpu:
        queues += ["cpu"] + (["gpu"] if accept_gpu_runs else [])
        env.update(ORCH_DEVICE="cpu", CUDA_VISIBLE_DEVICES="", ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
        default_name = "cpu@%h"
    else:
        default_name = "control@%h"
        env["ORCH_PRELOAD"] = "0"  # callbacks never train: no torch import here
    if control:
        queues.append("control")
    procs = concurrency if (concurrency and gpu is None and not cpu) else 1
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", ",".join(queues),
            "-c", str(procs), "-P", "prefork", "-n", name or default_name, "-E",
            "--without-mingle", "--without-gossip", "--loglevel", loglevel]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(errors.EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(errors.EXIT_USAGE)
    except OrchestratorError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(errors.EXIT_INTERRUPTED)
