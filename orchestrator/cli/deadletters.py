"""`orchestrator deadletters`: the messages workers refused, with why; and their purge."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from .. import errors
from .base import cli, cluster_paths, out


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every field, raw prefix included).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1, max=10_000),
              help="Show the newest N.")
@click.option("--purge", is_flag=True, help="Delete every dead letter (prints how many there were).")
@click.option("--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
              help="Redis URL of the cluster [env ORCH_BROKER_URL]; the dead letters are in its state "
              "Redis (ORCH_STATE_URL, when set).")
def deadletters(as_json: bool, limit: int, purge: bool, broker: str | None) -> None:
    """List the messages workers refused (newest first) with the reason, or purge them.

    A message from the broker that cannot be decoded, is too large or too deeply
    nested, names a task that is not this project's, comes from a queue its task may
    not come from, or carries a run spec that does not validate, is moved here once and
    never delivered again. The list keeps the newest 10,000.

    \b
    Examples:
      orchestrator deadletters --broker redis://head:6379/0
      orchestrator deadletters --json --limit 1000 | jq '.dead_letters[].reason'
      orchestrator deadletters --purge
    """
    from kombu.utils.url import maybe_sanitize_url
    from redis.exceptions import RedisError

    from ..execution.deadletters import DeadLetters

    _, url = cluster_paths(broker, None)
    letters = DeadLetters.from_url(url)
    try:
        if purge:
            n = letters.purge()
            out.print(json.dumps({"purged": n}) if as_json else f"purged {n} dead letter{'' if n == 1 else 's'}")
            return
        total, entries = letters.count(), letters.list(limit)
    except RedisError as exc:
        raise errors.EnvironmentProblem(f"cannot reach Redis at {maybe_sanitize_url(url)}: {exc}") from None
    if as_json:
        out.print(json.dumps({"count": total, "dead_letters": entries}, indent=2), markup=False)
        return
    if not entries:
        out.print("no dead letters")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("time", "queue", "task", "task id", "reason"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        table.add_row(_when(entry.get("time")), *(escape(str(entry.get(k) or "-"))
                                                  for k in ("queue", "task", "task_id", "reason")))
    out.print(table)
    shown = f"the newest {len(entries)} of {total}" if total > len(entries) else f"{total}"
    out.print(f"{shown} dead letter{'' if total == 1 else 's'} (--json for the raw messages, --purge to delete)")


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (TypeError, ValueError, OverflowError, OSError):  # anyone can push to the list
        return "-"
