"""Thin Celery task of a data-parallel run's ranks 1..N-1 (orchestrator.execution.ranks
does the work; docs/data-parallel.md). Rank 0 is the run's own train_run delivery, which
sends these to `rank.<worker>`, the queue only the reserved worker takes first.
"""

from __future__ import annotations

import functools
from typing import Any

from orchestrator import keys
from orchestrator.execution.ranks import RANK_TASK, run_rank

from . import app


@functools.cache
def _client() -> Any:
    """Made lazily, in the pool process that uses it (never shared across a fork)."""
    return keys.client(app.conf.orch_state_url)


# acks_late=False: a rank message is acknowledged as it starts. A rank whose process dies
# is not delivered again: its attempt is over (its peers stop, rank 0 relaunches the gang
# under a new attempt, and a stale rank message would only find itself fenced).
@app.task(name=RANK_TASK, bind=True, acks_late=False, ignore_result=True)
def train_rank(self: Any, spec: dict[str, Any], rank: int, attempt: int, backend: str) -> dict[str, Any]:
    """One rank (>= 1) of a data-parallel attempt: join, train in step, write nothing."""
    return run_rank(_client(), {"spec": spec, "rank": rank, "attempt": attempt,
                                                 "backend": backend}, self.request.hostname or "unknown")


def send_rank(queue: str, kwargs: dict[str, Any]) -> None:
    app.send_task(RANK_TASK, kwargs=kwargs, queue=queue)
