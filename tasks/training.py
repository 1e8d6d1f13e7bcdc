"""Thin Celery tasks: decode the request, call plain Python, turn its outcome into Celery.

Everything they receive comes from the broker and is treated as untrusted; the plain
Python behind them (orchestrator.execution.attempt, orchestrator.collect.groupend) validates each message
whole before it touches anything, and records refusals in the dead letters.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.exceptions import Reject, SoftTimeLimitExceeded

from orchestrator.collect.groupend import GroupEnd
from orchestrator.execution.admission import Shares
from orchestrator.execution.attempt import (
    Delivery,
    Finished,
    GiveUp,
    HandBack,
    Park,
    RetryLater,
    Services,
    attempt,
    part_of,
)
from orchestrator.execution.leases import Leases
from orchestrator.execution.returns import Returns, ReturnSink
from orchestrator.execution.runner import SharedSink
from orchestrator.execution.transfer import RETURN
from orchestrator.livestate import LiveState
from orchestrator.paths import Layout

from . import app
from .admission import stop_consuming
from .ranks import send_rank
from .search import after_group

log = logging.getLogger(__name__)


@functools.cache
def _services() -> Services:
    """Made lazily, in the process that uses them (never shared across a fork)."""
    leases = Leases.from_url(app.conf.orch_state_url)
    layout = Layout(app.conf.orch_results_root)
    returns = Returns(leases.client, ttl=app.conf.result_expires)

    def sink() -> SharedSink | ReturnSink:
        """Where this worker's runs go (ORCH_RESULTS_TRANSFER): the shared results root,
        or back through Redis to the control worker (a fresh scratch folder per task)."""
        if app.conf.orch_results_transfer == RETURN:
            return ReturnSink(returns, app.conf.orch_return_max_bytes, app.conf.orch_scratch_dir)
        return SharedSink(layout)

    return Services(layout=layout, leases=leases, live=LiveState.from_url(app.conf.orch_state_url),
                    shares=Shares(leases.client), sink=sink, timeouts=(SoftTimeLimitExceeded,),
                    send_rank=send_rank)


@functools.cache
def _group_end() -> GroupEnd:
    svc = _services()
    return GroupEnd(svc.layout, svc.live, Returns(svc.leases.client, ttl=app.conf.result_expires),
                    app.conf.orch_return_max_bytes)


def _delivery(task: Any) -> Delivery:
    request = task.request
    return Delivery(task_id=request.id, task=task.name, hostname=request.hostname or "unknown",
                    queue=(request.delivery_info or {}).get("routing_key"))


# ignore_result: a run's outcome lives in its status file and the live state; nothing
# reads its Celery result. Storing it cost a GET, a SET and a PUBLISH per run (~0.14 ms of
# worker CPU), and ~1 KB of Redis memory per run (the spec, with result_extended) kept
# for result_expires (7 days). The chord still counts the run (Celery hands the result to
# the chord whether it is stored or not, once per task id), and a failure is still
# stored, for whoever looks up a refused message.
@app.task(name="tasks.train_run", bind=True, max_retries=None, default_retry_delay=1,
          ignore_result=True, store_errors_even_if_ignored=True)
def train_run(self: Any, spec: dict[str, Any], submitted_at: float | None = None) -> dict[str, Any]:
    """Train one run (one fold of one parameter point) on this worker's device, holding
    its lease from start to end (orchestrator.execution.attempt decides; this says it to Celery)."""
    delivery = _delivery(self)
    outcome = attempt(_services(), spec, submitted_at, delivery)
    if isinstance(outcome, Finished):
        return outcome.result
    if isinstance(outcome, RetryLater):
        raise self.retry(exc=outcome.error, countdown=outcome.seconds, max_retries=None) from outcome.error
    if isinstance(outcome, Park):  # same message and chord, on a queue no worker consumes
        raise self.retry(queue=outcome.queue, countdown=0, max_retries=None)
    if isinstance(outcome, HandBack):
        if outcome.gpus:  # this GPU lacks room: stop taking runs until it has (tasks.admission)
            stop_consuming(delivery.hostname)
        # Requeued if still unacknowledged (a warm stop, a GPU hand-back); a zombie's
        # delivery was handed on by the watchdog already: then a no-op.
        raise Reject(outcome.reason, requeue=True)
    assert isinstance(outcome, GiveUp)
    if outcome.refused and not part_of(spec, self.request.chord):
        # A refused message that is not one of its chord's own runs counts in no chord and
        # calls no callback: a forged copy of a running group's message must not end that
        # group early (a genuine part refused here still counts: attempt.part_of).
        request = self.request
        request.chord = request.group = request.chain = None
        request.callbacks = request.errbacks = None
    raise outcome.error


@app.task(name="tasks.finalize", bind=True)
def finalize(self: Any, results: Any, specs: list[dict[str, Any]],
             folds: list[int] | None = None) -> dict[str, Any]:
    """Chord body: ensemble outputs, final_results.csv rows, status.json DONE (`specs`
    and `folds`: orchestrator.collect.groupend.group_specs)."""
    result = _group_end().finalize(specs, folds, _delivery(self))
    after_group(specs)  # a search's next step, if this group is one of its trials
    return result


# bind=True also keeps Celery calling it as a task with the failed task's id (a bound
# errback is never called inline with the request, exception and traceback).
@app.task(name="tasks.group_failed", bind=True)
def group_failed(self: Any, task_id: str, specs: list[dict[str, Any]],
                 folds: list[int] | None = None) -> dict[str, Any]:
    """Chord error callback: status.json FAILED with which folds failed and why."""
    result = _group_end().failed(specs, folds, _delivery(self))
    after_group(specs)
    return result
