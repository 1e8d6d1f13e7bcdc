"""ASHA's two messages between a run and the control side, over the Redis of the live
state: a run's report at a rung epoch (worker to control side: here), and the stop of a
pruned trial's runs (control side to worker: orchestrator.search.prune).

- A run whose spec has `report_at` (the rungs of its search's ASHA) writes the
  trainer's report at each of those epochs to `orch:rungs:<experiment>`, field
  `<run_id>:<epoch>`: every report, not only those the rate-limited progress sender
  lets through (runner._progress_sender keeps one a second, the latest only). The
  search's next step reads them (orchestrator.search.asha decides).
- A pruned trial's runs are stopped as a cancel stops a run, but one run at a time:
  each fold not ended is recorded CANCELLED with the reason, under the results root and
  in Redis's fold record that return-mode workers read (so a redelivered or queued
  message of it reports CANCELLED without training), then the lease of an attempt
  training it is revoked: its renewal thread sees that within a quarter lease, and the
  trainer stops at its next report, writing nothing; the worker takes its next run.

Plain Python and Redis: the worker imports this module (never Optuna or the engine).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

from .. import keys
from ..experiment.spec import RunSpec

TTL_SECONDS = 7 * 24 * 3600
MAX_FIELDS = 100_000  # what a step reads of the hash at most (it is untrusted input)
MAX_VALUES = 32  # numbers kept of one report
_FIELD = re.compile(r"^([0-9a-f]{16}):([0-9]{1,7})$")
# The Celery task that advances a search (tasks/search.py): named here, in plain Python,
# so that a worker's runner can ask for a step without importing the task modules.
SEARCH_STEP = "tasks.search_step"


def step_soon(experiment: str) -> None:
    """A step of the search on the control queue (tasks.search_step), so that a rung
    report is judged now rather than at the watchdog's next step."""
    from tasks import app

    app.send_task(SEARCH_STEP, args=(experiment,), queue="control")


def sender(live: Any, spec: RunSpec,
           nudge: Callable[[str], None] | None = step_soon) -> Callable[[dict[str, Any]], None]:
    """The worker's side: a Reporter hook writing the reports at `spec.report_at`, then
    asking for a step of the search (`nudge`). Redis or broker trouble never stops the
    training (the trial is then judged at the watchdog's next step, or, without its
    report, not at that rung: it trains on, which costs epochs, never a wrong result)."""
    epochs = frozenset(spec.report_at)
    key = keys.rungs(spec.experiment)

    def send(report: dict[str, Any]) -> None:
        epoch = report.get("epoch")
        if type(epoch) is not int or epoch not in epochs:
            return
        values = {str(k): float(v) for k, v in list(report.items())[:MAX_VALUES]
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        with contextlib.suppress(Exception):
            pipe = live.client.pipeline(transaction=False)
            pipe.hset(key, f"{spec.run_id}:{epoch}", json.dumps(values))
            pipe.expire(key, TTL_SECONDS)
            pipe.execute()
            if nudge is not None:
                nudge(spec.experiment)

    return send


Reports = dict[tuple[str, int], dict[str, float]]


def read(live: Any, experiment: str) -> Reports:
    """The control side's read of every rung report of a search: (run_id, epoch) ->
    {name: value}. Fields and values are checked (anything with access to Redis could
    have written them); a malformed one is skipped."""
    raw = live.client.hgetall(keys.rungs(experiment))
    out: Reports = {}
    for field, value in list(raw.items())[:MAX_FIELDS]:
        m = _FIELD.match(field.decode(errors="replace") if isinstance(field, bytes) else str(field))
        if m is None:
            continue
        try:
            data = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        out[(m.group(1), int(m.group(2)))] = {
            str(k): float(v) for k, v in list(data.items())[:MAX_VALUES]
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    return out
