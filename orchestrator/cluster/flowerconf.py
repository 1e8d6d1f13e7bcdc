"""How `orchestrator flower` starts Flower: credentials, state file and command line.

Pure functions of the environment and the options, so the tests can check every
decision without starting anything. `orchestrator.cli.flower` adds the checks that
need the network (broker reachable, port free) and then replaces itself with Flower.

Why Flower is started this way:
- `python -m celery -A tasks flower`: the app loads `celeryconfig`, so Flower's kombu
  client restores unacknowledged messages with the SAME visibility timeout as the
  workers. A bare `--broker` would use kombu's default (1 h) and redeliver every run
  that trains longer than that (celery#7651, #5935).
- Credentials travel in the child's environment (`FLOWER_BASIC_AUTH`, which Flower
  reads itself), never on its command line, where `ps` would show them to every user.
- `--persistent` with a periodic save: a restart keeps the task history; a crash loses
  at most one save interval.
- `--max_tasks`: Flower keeps every task it has seen in memory (default 100,000,
  flower#1305); a sweep of a few thousand runs a day must not grow it without bound.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import OrchestratorError

USER_VAR = "ORCH_FLOWER_USER"
PASSWORD_VAR = "ORCH_FLOWER_PASSWORD"
FLOWER_AUTH_VAR = "FLOWER_BASIC_AUTH"  # Flower's own: "user:password[,user2:password2]"

DEFAULT_PORT = 5555
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_MAX_TASKS = 20_000
DEFAULT_SAVE_INTERVAL = 60.0  # seconds between state saves
# The tasks page lists each run by its readable name (canvas.py sets argsrepr to it),
# state, arrival (the sort column), runtime, worker and exception; the uuid opens its details.
DEFAULT_TASK_COLUMNS = "args,name,state,received,runtime,worker,uuid,exception"

# Options the caller may not pass through to Flower: the broker comes from celeryconfig
# (ORCH_BROKER_URL / --broker of this command), credentials from the environment.
_FORBIDDEN_EXTRA = {
    "-b": "the broker comes from celeryconfig: use --broker of this command or ORCH_BROKER_URL",
    "--broker": "the broker comes from celeryconfig: use --broker of this command or ORCH_BROKER_URL",
    "--basic_auth": f"credentials on a command line are visible in `ps`: set {USER_VAR} and {PASSWORD_VAR}",
    "--basic-auth": f"credentials on a command line are visible in `ps`: set {USER_VAR} and {PASSWORD_VAR}",
}
# Set by this module's options; a second value after `--` would silently win.
# (--tasks_columns may be given again after `--`: the last value wins, on purpose.)
_OWN_OPTIONS = {"address", "port", "persistent", "db", "state_save_interval", "max_tasks",
                "purge_offline_workers", "read_only"}


class FlowerAuthError(OrchestratorError):
    """Flower would start without credentials, or with credentials it cannot parse."""


@dataclass(frozen=True)
class FlowerOptions:
    """What `orchestrator flower` was asked for (validated by click's types)."""

    state_dir: Path
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT
    max_tasks: int = DEFAULT_MAX_TASKS
    save_interval: float = DEFAULT_SAVE_INTERVAL
    purge_offline_workers: int | None = None
    read_only: bool = False
    auth: bool = True
    extra: tuple[str, ...] = field(default=())


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_STATE_HOME/orchestrator/flower, else ~/.local/state/orchestrator/flower.

    Local to the host that runs Flower: the shelve file is rewritten every save, which
    a shared (NFS) results root is not a good place for.
    """
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "orchestrator" / "flower"


def db_path(state_dir: Path, broker_url: str) -> Path:
    """One state file per broker, named after it without its password.

    Two Flowers for two clusters on one host must not share (and mix) a history.
    """
    parts = urlsplit(broker_url)
    where = f"{parts.hostname or 'localhost'}-{parts.port or 6379}" if parts.scheme.startswith("redis") \
        else parts.path
    db = parts.path.strip("/") if parts.scheme.startswith("redis") else ""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{where}-{db or '0'}").strip("-")
    return state_dir / f"flower-state-{name}"


def basic_auth(environ: Mapping[str, str]) -> str:
    """The FLOWER_BASIC_AUTH value to give Flower, from ORCH_FLOWER_USER/PASSWORD
    (preferred) or FLOWER_BASIC_AUTH; FlowerAuthError if neither is usable."""
    user, password = environ.get(USER_VAR, ""), environ.get(PASSWORD_VAR, "")
    if user or password:
        missing = [name for name, value in ((USER_VAR, user), (PASSWORD_VAR, password)) if not value]
        if missing:
            raise FlowerAuthError(
                f"{missing[0]} is not set (or empty): set both {USER_VAR} and {PASSWORD_VAR}")
        if ":" in user or "," in user:
            raise FlowerAuthError(f"{USER_VAR} must not contain ':' or ',' (got {user!r})")
        if "," in password:
            raise FlowerAuthError(f"{PASSWORD_VAR} must not contain ',' (Flower splits its "
                                  "credential list on commas)")
        return f"{user}:{password}"
    raw = environ.get(FLOWER_AUTH_VAR, "")
    if raw:
        for entry in raw.split(","):
            user, sep, password = entry.partition(":")
            if not (user and sep and password):
                raise FlowerAuthError(
                    f"{FLOWER_AUTH_VAR} must be user:password[,user2:password2]; an entry "
                    "has no user or no password")
        return raw
    raise FlowerAuthError(
        f"Flower needs credentials: set {USER_VAR} and {PASSWORD_VAR} (or {FLOWER_AUTH_VAR}="
        "user:password), or pass --no-auth to serve it without a login "
        "(only behind your own authenticating proxy)")


def check_extra(extra: tuple[str, ...]) -> None:
    """Refuse pass-through options that would undo what this command guarantees."""
    from flower.options import default_options  # Flower's own option registry

    for arg in extra:
        name = arg.partition("=")[0]
        if name in _FORBIDDEN_EXTRA:
            raise OrchestratorError(f"flower option {name} is not accepted: {_FORBIDDEN_EXTRA[name]}")
        key = name.lstrip("-").replace("-", "_")
        if key in _OWN_OPTIONS:
            raise OrchestratorError(f"flower option {name} is set by this command: use its own "
                                    "option instead (see `orchestrator flower --help`)")
        # Flower silently drops what it does not know: a typo would go unnoticed.
        if not name.startswith("--") or "=" not in arg or key not in default_options:
            raise OrchestratorError(
                f"{arg!r} after `--` is not a Flower option in the form --name=value "
                "(see `celery -A tasks flower --help`, e.g. --url_prefix=flower)")


def flower_command(opts: FlowerOptions, broker_url: str,
                   environ: Mapping[str, str]) -> tuple[list[str], dict[str, str], Path]:
    """The argv and environment that run Flower, and its state file."""
    check_extra(opts.extra)
    env = {k: v for k, v in environ.items() if k not in (FLOWER_AUTH_VAR, PASSWORD_VAR)}
    if opts.auth:
        env[FLOWER_AUTH_VAR] = basic_auth(environ)
    env["ORCH_BROKER_URL"] = broker_url
    db = db_path(opts.state_dir, broker_url)
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "flower",
            f"--address={opts.address}", f"--port={opts.port}",
            "--persistent=True", f"--db={db}",
            f"--state_save_interval={int(opts.save_interval * 1000)}",
            f"--max_tasks={opts.max_tasks}", f"--tasks_columns={DEFAULT_TASK_COLUMNS}",
            # Workers send events from their start (-E): Flower need not ask them every few
            # seconds on the remote-control channel, which its Redis user may not publish
            # on (docs/security.md: a user that may would also send `shutdown`).
            "--enable_events=False"]
    if opts.purge_offline_workers is not None:
        argv.append(f"--purge_offline_workers={opts.purge_offline_workers}")
    if opts.read_only:
        argv.append("--read_only=True")
    argv.extend(opts.extra)
    return argv, env, db
