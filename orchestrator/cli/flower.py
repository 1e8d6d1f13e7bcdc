"""`orchestrator flower`: Flower with this project's Celery settings, auth and bounded state."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import click

from .. import errors
from ..cluster.flowerconf import (
    DEFAULT_ADDRESS,
    DEFAULT_MAX_TASKS,
    DEFAULT_PORT,
    DEFAULT_SAVE_INTERVAL,
    FLOWER_AUTH_VAR,
    PASSWORD_VAR,
    USER_VAR,
    FlowerOptions,
    default_state_dir,
    flower_command,
)
from ..errors import EnvironmentProblem
from .base import check_redis_url, cli, err


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _check_broker(url: str) -> None:
    """Fail now, with a message, rather than have Flower retry a dead broker forever."""
    import redis

    from .. import keys

    try:
        keys.client(url, "command").ping()
    except redis.RedisError as exc:
        raise EnvironmentProblem(f"cannot reach the broker at {_safe_url(url)}: {exc}") from None


def _check_port(address: str, port: int) -> None:
    """Same bind as Tornado's (SO_REUSEADDR), so a port in TIME_WAIT still counts as free."""
    try:
        infos = socket.getaddrinfo(address or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise errors.OrchestratorError(f"--address {address!r} is not an address of this host: "
                                       f"{exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot listen on {address}:{port}: {exc.strerror} "
                                     "(choose another --port or stop what uses it)") from None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


@cli.command()
@click.option("--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
              help="Redis URL of the cluster [env ORCH_BROKER_URL; default as in celeryconfig.py, "
                   "redis://127.0.0.1:6379/0].")
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the persistent state file, one file per broker [default: "
                   "$XDG_STATE_HOME/orchestrator/flower, else ~/.local/state/orchestrator/flower].")
@click.option("--max-tasks", default=DEFAULT_MAX_TASKS, show_default=True, type=click.IntRange(100),
              help="Tasks kept in memory (and in the state file); the oldest are dropped.")
@click.option("--save-interval", default=DEFAULT_SAVE_INTERVAL, show_default=True,
              type=click.FloatRange(1, 86400), metavar="SECONDS",
              help="Save the state this often (also on SIGTERM); a crash loses at most this much.")
@click.option("--purge-offline-workers", default=None, type=click.IntRange(1), metavar="SECONDS",
              help="Forget workers offline for this long [default: keep them, shown offline].")
@click.option("--read-only", is_flag=True,
              help="No revoke, terminate, pool or shutdown (pages and API): a viewing-only Flower.")
@click.option("--no-auth", is_flag=True,
              help="Serve without a login (only behind a proxy that authenticates).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(broker: str | None, address: str, port: int, state_dir: Path | None, max_tasks: int,
           save_interval: float, purge_offline_workers: int | None, read_only: bool, no_auth: bool,
           flower_args: tuple[str, ...]) -> None:
    """Start Flower on the cluster's broker, with this project's celeryconfig and a login.

    \b
    Credentials come from the environment, never the command line:
      ORCH_FLOWER_USER and ORCH_FLOWER_PASSWORD (or Flower's FLOWER_BASIC_AUTH=user:password).
    Without them it refuses to start (exit 2) unless --no-auth is given.
    Further Flower options may follow `--`, e.g. `-- --url_prefix=flower`.
    /metrics (Prometheus) and /healthcheck are served without a login.

    \b
    Example:
      export ORCH_BROKER_URL=redis://:PASSWORD@head:6379/0
      export ORCH_FLOWER_USER=ops ORCH_FLOWER_PASSWORD=...   # or an EnvironmentFile
      orchestrator flower --address 0.0.0.0 --port 5555
    """
    url = broker or os.environ.get("ORCH_BROKER_URL") or "redis://127.0.0.1:6379/0"
    check_redis_url(url, "broker URL (--broker / ORCH_BROKER_URL)")
    opts = FlowerOptions(state_dir=(state_dir or default_state_dir(os.environ)).resolve(),
                         address=address, port=port, max_tasks=max_tasks,
                         save_interval=save_interval, purge_offline_workers=purge_offline_workers,
                         read_only=read_only, auth=not no_auth, extra=flower_args)
    # Everything that needs no network first: a usage error must not wait on a broker.
    argv, env, db = flower_command(opts, url, os.environ)
    os.environ["ORCH_BROKER_URL"] = url
    import celeryconfig  # noqa: F401  (a bad ORCH_* value: exit 2 here, not a traceback in Flower)

    try:
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        probe = opts.state_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise EnvironmentProblem(f"state folder {opts.state_dir} is not writable: "
                                 f"{exc.strerror or exc}") from None
    _check_port(address, port)
    _check_broker(url)
    if no_auth:
        err.print(f"[yellow]warning:[/] Flower serves WITHOUT a login on {address}:{port}"
                  + ("" if _is_loopback(address) else ": anyone who reaches it can revoke runs "
                     "and shut workers down"))
    elif os.environ.get(USER_VAR) or os.environ.get(PASSWORD_VAR):
        err.print(f"flower: login as {os.environ[USER_VAR]!r} ({USER_VAR}/{PASSWORD_VAR})",
                  markup=False)
    else:
        err.print(f"flower: login from {FLOWER_AUTH_VAR}", markup=False)
    err.print(f"flower: http://{address}:{port}/ on {_safe_url(url)}; state {db}; "
              f"at most {max_tasks} tasks; /metrics for Prometheus", markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: a service manager's SIGTERM reaches Flower, which saves its state.
    os.execve(sys.executable, argv, env)
