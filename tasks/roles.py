"""Thin Celery task of a role instance (orchestrator.roles.instance does the work;
docs/roles.md). Routed like runs (`cpu` or `gpu` from the role's resources), acks_late:
the message stays unacknowledged while the role runs, so that when the instance's lease
lapses the watchdog hands the same message on to another worker.
"""

from __future__ import annotations

import functools
from typing import Any

import redis
from celery.exceptions import Reject

from orchestrator import keys
from orchestrator.execution.runner import WorkerInfo
from orchestrator.paths import Layout
from orchestrator.roles.instance import Done, Failed, HandBack, give_up, run_instance
from orchestrator.roles.spec import ROLE_TASK

from . import app

ROLE_RETRIES = 3  # a role function that raises is started again this many times
BACKOFF_MAX_S = 60.0  # Redis unreachable: the instance starts again after 1, 2, 4 ... 60 s


@functools.cache
def _client() -> Any:
    """Made lazily, in the pool process that uses it (never shared across a fork)."""
    return keys.client(app.conf.orch_state_url)


@app.task(name=ROLE_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=ROLE_RETRIES)
def role_run(self: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one role instance (an actor, the learner, an evaluator) until its experiment
    ends, is cancelled, or the instance is fenced."""
    hostname = self.request.hostname or "unknown"
    worker = WorkerInfo.from_env(hostname)
    outcome = run_instance(_client(), Layout(app.conf.orch_results_root), spec, hostname, worker.device,
                           self.request.id)
    if isinstance(outcome, Done):
        return outcome.result
    if isinstance(outcome, HandBack):
        raise Reject(outcome.reason, requeue=True)
    assert isinstance(outcome, Failed)
    retries = int(self.request.retries or 0)
    if outcome.transient or isinstance(outcome.error, redis.RedisError):  # not the role's fault: no cap, backoff
        raise self.retry(exc=outcome.error, countdown=min(BACKOFF_MAX_S, 2.0 ** retries), max_retries=None)
    if retries >= ROLE_RETRIES:  # the role's own failure, for good: its experiment ends FAILED
        why = give_up(_client(), Layout(app.conf.orch_results_root), spec, outcome.error, retries + 1)
        return {"status": "FAILED", "why": why}
    raise self.retry(exc=outcome.error, countdown=2)


def send_role(spec: dict[str, Any], queue: str) -> str:
    """Publish one role instance's task; returns its task id."""
    return str(app.send_task(ROLE_TASK, kwargs={"spec": spec}, queue=queue).id)
