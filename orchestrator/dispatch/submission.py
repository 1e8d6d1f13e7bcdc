"""Submitting planned experiments to the cluster: what `orchestrator submit`/`run` and the
Python API (orchestrator.api) do, with the broker's failures turned into
EnvironmentProblem. Plain Python: no printing (`report` hears of each experiment)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import EnvironmentProblem
from ..experiment.config import Experiment
from ..experiment.plan import GroupPlan
from ..paths import Layout

if TYPE_CHECKING:
    from ..livestate import LiveState

Report = Callable[[Experiment, dict[str, int]], None]


def submit_experiments(exps: list[Experiment], plans: dict[str, list[GroupPlan]], layout: Layout,
                       report: Report | None = None, add: bool = False, check: bool = True,
                       live: LiveState | None = None) -> LiveState:
    """Publish every experiment's plan to the broker of ORCH_BROKER_URL (cluster.endpoints.
    use_broker); returns the LiveState used. `report(exp, counts)` after each experiment
    (counts: runs, groups, finalize_only published). `add`: the plans' groups are added to
    the experiment's manifest instead of replacing it, and the broker connection is kept
    for the next such call (evaluations, orchestrator.api). `check`: reach Redis and the
    broker before anything is written (a caller that just did may skip it)."""
    from celery.exceptions import OperationalError
    from kombu.exceptions import BatchPublishError, KombuError
    from redis.exceptions import RedisError

    import celeryconfig  # noqa: F401  (Celery loads it lazily: report a bad ORCH_* value first)

    from ..livestate import LiveState
    from .canvas import check_connections, follow_environment, submit

    broker = os.environ["ORCH_BROKER_URL"]
    follow_environment()
    if live is None:
        live = LiveState.from_url(os.environ.get("ORCH_STATE_URL", broker))
    try:
        if check:
            check_connections(live)
        for exp in exps:
            published = submit(exp, plans[exp.name], layout, live, add=add)
            if report is not None:
                report(exp, published)
    except BatchPublishError as exc:  # orchestrator.dispatch.canvas publishes in pipelines
        raise EnvironmentProblem(
            f"publishing to the broker at {broker} broke off part-way "
            f"({exc.__cause__ or exc}): some runs may be queued, others not. Submit the same "
            f"configs again once the broker answers: runs DONE are skipped, and a run queued "
            f"twice still trains once.") from None
    except (OperationalError, KombuError, RedisError) as exc:
        raise EnvironmentProblem(f"cannot reach the broker at {broker}: {exc}") from None
    return live
