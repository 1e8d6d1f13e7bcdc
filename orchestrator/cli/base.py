"""What every subcommand shares: the click group, consoles, results root and broker checks."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console

from .. import errors
from ..errors import EnvironmentProblem
from ..experiment.config import Experiment
from ..experiment.expand import expand
from ..experiment.plan import GroupPlan, make_plan
from ..paths import Layout

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def results_root_path(value: str | None, writable: bool = False) -> Path:
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


def check_redis_url(url: str, what: str) -> str:
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


def use_broker(url: str, results_root: Path, private: bool = False) -> None:
    """Point this process (and `tasks`, imported later) at a broker and results root.

    A private (local-mode) Redis is also the result backend and the live state, whatever
    the environment says: its workers were started that way, and polling another Redis
    would wait forever.
    """
    if not private:
        check_redis_url(url, "broker URL (--broker / ORCH_BROKER_URL)")
        for name in ("ORCH_RESULT_BACKEND", "ORCH_STATE_URL"):
            if os.environ.get(name):
                check_redis_url(os.environ[name], name)
    os.environ["ORCH_BROKER_URL"] = url
    if private:
        os.environ["ORCH_RESULT_BACKEND"] = os.environ["ORCH_STATE_URL"] = url
    os.environ.setdefault("ORCH_RESULT_BACKEND", url)
    os.environ.setdefault("ORCH_STATE_URL", os.environ["ORCH_RESULT_BACKEND"])
    os.environ["ORCH_RESULTS_ROOT"] = str(results_root)


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

