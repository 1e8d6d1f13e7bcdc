"""Build and publish the Celery canvas: per group, chord(train_run per fold, finalize).

The only module of the orchestrator that imports `tasks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import chord

from tasks import app

from .. import keys
from ..collect.status import (
    Status,
    fold_state,
    read_fold_status,
    read_group_status,
    reset_group_status,
    write_fold_status,
)
from ..experiment.config import Experiment
from ..experiment.plan import FINALIZE, RUN, SKIP, GroupPlan, make_plan
from ..experiment.spec import RunSpec
from ..livestate import LiveState
from ..paths import Layout
from .manifest import add_to_manifest, write_manifest

log = logging.getLogger(__name__)


def _stop_listening_for_results() -> None:
    """Tell this (submitting) process's result backend not to listen for results.

    Celery's Redis backend SUBSCRIBEs the publishing process to each task's result
    channel, when the task is sent (`on_task_call`) and when a group/chord result is
    built (`add_pending_result`, via a barrier over the parts), so that
    `AsyncResult.get()` can wake up. The orchestrator never waits on Celery results
    (progress comes from the live state), so the subscriptions only cost a round trip
    per task, and the results they pin are collected at interpreter exit, when their
    `__del__` tries to unsubscribe from a Redis that local mode has already stopped
    (a traceback after a successful run). Workers and Flower are not affected: this
    changes only the backend object of the current thread of this process.
    """
    backend = app.backend
    backend.on_task_call = lambda producer, task_id: None
    backend.add_pending_result = lambda result, weak=False, start_drainer=True: result


@contextlib.contextmanager
def _one_producer(producer: Any) -> Iterator[None]:
    """While the block runs, every message this thread publishes through Celery goes
    through `producer`, and kombu reuses one Redis client object for its commands.

    Celery's chord ignores the producer it is given: each chord's header acquires a
    producer from the app's pool (and revives it), and kombu's Redis channel builds a
    new `redis.Redis` for every command sent without a client (`conn_or_acquire()`):
    every task message (LPUSH) and every task-sent event (PUBLISH). Building one costs
    about 0.2 ms of CPU (redis-py fills a table of ~200 response callbacks), as much as
    sending the command. The clients share the channel's connection pool, so one client
    sends exactly the same commands on the same connections. Both changes are
    attributes of this app and this channel, removed at the end; other threads (a
    worker's watchdog publishes too) still acquire their own producers.
    """
    thread = threading.get_ident()
    acquire = app.producer_or_acquire

    def producer_or_acquire(given: Any = None) -> Any:
        if given is None and threading.get_ident() == thread:
            return contextlib.nullcontext(producer)
        return acquire(given)

    channel = producer.channel
    patch_channel = all(hasattr(channel, a) for a in ("conn_or_acquire", "_create_client", "pool"))
    cached: dict[str, Any] = {}

    @contextlib.contextmanager
    def conn_or_acquire(client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = channel.pool  # a new pool after a reconnection: a new client for it
        if cached.get("pool") is not pool:
            cached["client"] = channel._create_client()
            cached["pool"] = pool
        yield cached["client"]

    app.producer_or_acquire = producer_or_acquire
    if patch_channel:
        channel.conn_or_acquire = conn_or_acquire
    try:
        yield
    finally:
        vars(app).pop("producer_or_acquire", None)
        if patch_channel:
            vars(channel).pop("conn_or_acquire", None)


# Commands per pipeline when publishing: each run is two (its message and its
# task-sent event), so a flush every ~10 groups of 5 folds; the first runs reach the
# workers after a few milliseconds of building messages.
PUBLISH_BATCH = 100


@contextlib.contextmanager
def _batch_producer(keep: bool = False) -> Iterator[tuple[Any, Any]]:
    """A producer whose messages (and task-sent events) go to Redis in pipelines of
    PUBLISH_BATCH commands (kombu's Producer.batch), not in a round trip each.

    kombu pipelines only on a connection that never retries a command by itself
    (a timed-out command may have been applied: a retry could send it twice), so this
    connection has `retry_on_timeout` off; a publish that fails mid-way raises
    (kombu's BatchPublishError: delivery uncertain) and `orchestrator submit` reports
    the broker as unreachable. Submitting again is safe: what is DONE is skipped, and a
    run delivered twice trains once (its lease). `keep`: the connection stays open for
    this thread's next publish with `keep` (_KEPT)."""
    options = {"retry_on_timeout": False}
    key = (threading.get_ident(), app.conf.broker_url)
    conn = _KEPT.pop(key, None) if keep else None
    if conn is None:
        conn = app.connection_for_write(transport_options=options)
    kept = False
    try:
        producer = app.amqp.Producer(conn, auto_declare=False)
        with producer.batch(max_size=PUBLISH_BATCH) as batch:
            yield producer, batch
        if keep:
            _KEPT[key] = conn
            kept = True
    finally:
        if not kept:
            conn.release()


# (thread, broker URL) -> the connection `_batch_producer(keep=True)` publishes on: one
# publish after another (the evaluations of orchestrator.api, one at a time) reuses it
# instead of connecting anew (a kombu connection opens several Redis connections). A
# publish that fails drops it.
_KEPT: dict[tuple[int, str], Any] = {}


# The tasks by name (tasks/training.py): publishing needs no import of the task modules.
TRAIN_RUN, FINALIZE_TASK, GROUP_FAILED = "tasks.train_run", "tasks.finalize", "tasks.group_failed"


def message_priority(priority: int) -> int:
    """YAML priority 9 is the most urgent; kombu's Redis transport serves 0 first."""
    return 9 - priority


def _train_signature(spec: RunSpec, data: dict[str, Any], submitted_at: float) -> Any:
    options: dict[str, Any] = {
        "queue": spec.queue, "priority": message_priority(spec.priority),
        "argsrepr": repr(spec.name), "kwargsrepr": "{}",
    }
    if spec.timeout is not None:
        options["soft_time_limit"] = spec.timeout
        options["time_limit"] = spec.timeout + 30  # hard kill if the soft limit is ignored
    # submitted_at: a run cancelled after this moment is dropped when it is reached.
    return app.signature(TRAIN_RUN, args=(data,), kwargs={"submitted_at": submitted_at}, **options)


def _group_options(plan: GroupPlan, kwargs: dict[str, Any]) -> dict[str, Any]:
    """How a group's callback reads in Flower: the group's name, and its kwargs."""
    return {"queue": "control", "argsrepr": repr(plan.first.group_name), "kwargsrepr": repr(kwargs)}


def follow_environment() -> None:
    """Point the Celery app at the broker and backend that ORCH_BROKER_URL and
    ORCH_RESULT_BACKEND name now (cluster.endpoints.use_broker), if it was configured
    for others: a Python process may talk to one cluster after another (`orch.local()`
    twice), while celeryconfig read the environment once, at its import."""
    import os

    from ..keys import celery_url

    given = os.environ.get("ORCH_BROKER_URL")
    state = os.environ.get("ORCH_STATE_URL") or os.environ.get("ORCH_RESULT_BACKEND") or given
    broker = celery_url(given) if given else None
    backend = celery_url(os.environ.get("ORCH_RESULT_BACKEND") or given or "")
    conf = app.conf
    if not broker or (conf.broker_url == broker and conf.result_backend == backend):
        return
    if getattr(app, "_pool", None) is not None:  # connections to the old broker: closed, the pool forgotten
        app._pool.force_close_all()
    for key in [k for k in _KEPT if k[1] != broker]:
        with contextlib.suppress(Exception):
            _KEPT.pop(key).release()
    conf.broker_url, conf.result_backend = broker, backend
    conf.orch_state_url = state
    app._pool = None
    app.amqp._producer_pool = None
    app._backend_cache = None  # Celery 5.7 keeps the backend here, or per thread:
    vars(app._local).pop("backend", None)


def check_connections(live: LiveState) -> None:
    """Reach the live-state Redis and the broker before anything is written: a submit
    that cannot publish must leave the results root as it was."""
    live.client.ping()
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)


def submit(exp: Experiment, plans: list[GroupPlan], layout: Layout, live: LiveState,
           add: bool = False) -> dict[str, int]:
    """Publish what the plan says; returns counts of what was published. `add`: the
    groups join the experiment's manifest (add_to_manifest) instead of replacing it."""
    dicts = add_to_manifest(layout, exp, plans) if add else write_manifest(layout, exp, plans)
    prepare(layout, live, exp.name, plans)
    return publish(plans, dicts, keep=add)


def prepare(layout: Layout, live: LiveState, experiment: str, plans: list[GroupPlan]) -> None:
    """Before publishing `plans`: their stale records reset (a FAILED or CANCELLED fold
    is PENDING again) and their live states set."""
    states: dict[str, str] = {}
    for p in plans:
        todo = {s.run_id for s in p.todo}
        for s in p.specs:
            states[s.run_id] = Status.PENDING.value if s.run_id in todo else Status.DONE.value
        if p.fresh:  # no status folder: no record to reset or to make PENDING
            continue
        if p.action != SKIP:  # it will be finalized again: its old record is stale
            reset_group_status(layout, p.first)
        for s in p.specs:
            if s.run_id in todo:
                old = read_fold_status(layout, s)
                # FAILED/CANCELLED become PENDING again; an IN_PROGRESS fold may be training
                # on a worker right now and keeps its record until this attempt starts.
                if old is not None and old.get("status") in (Status.FAILED.value, Status.CANCELLED.value):
                    write_fold_status(layout, s, Status.PENDING, base=old, error=old.get("error"))
    live.set_runs(experiment, states)
    live.clear_groups(experiment, [p.first.group_id for p in plans if p.action != SKIP])
    live.set_groups(experiment, {p.first.group_id: Status.DONE.value for p in plans if p.action == SKIP})


class _Spec(dict):  # type: ignore[type-arg]
    """A run's spec as a message argument. Celery's canvas deep-copies a signature's
    arguments each time it clones one (three times per message on the way to the
    broker: 327,000 deepcopy calls in a profile of a 1000-run submit, 77,000 with
    this); nothing changes a spec once it is built, so a copy is the spec itself. It
    is sent as a plain dict."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Spec:
        return self


def publish(plans: list[GroupPlan], dicts: dict[str, dict[str, Any]], keep: bool = False) -> dict[str, int]:
    """Per group to run: chord(train_run per fold to do, finalize); per group to finalize
    only: finalize. Returns counts of what was published."""
    dicts = {run_id: _Spec(d) for run_id, d in dicts.items()}
    published = {"runs": 0, "groups": 0, "finalize_only": 0}
    now = time.time()
    _stop_listening_for_results()
    with _batch_producer(keep) as (producer, batch), _one_producer(producer):
        for p in plans:
            # The group's callbacks get one spec and the folds (orchestrator.collect.groupend.group_specs):
            # every run's message carries them (the chord body and its error callback),
            # so 2 specs each instead of 2 per fold (a 7.5 KB message of 5 folds: 2.5 KB).
            folds = {"folds": [s.fold for s in p.specs]}
            spec = [dicts[p.first.run_id]]
            body = app.signature(FINALIZE_TASK, args=(spec,), kwargs=folds,
                                 **_group_options(p, folds)).on_error(
                app.signature(GROUP_FAILED, kwargs={"specs": spec, **folds}, queue="control"))
            if p.action == RUN:
                header = [_train_signature(s, dicts[s.run_id], now) for s in p.todo]
                chord(header, app=app)(body, producer=producer)
                published["runs"] += len(header)
                published["groups"] += 1
                if published["groups"] == 1:
                    batch.flush()  # the workers start on the first group at once
            elif p.action == FINALIZE:
                body.apply_async(args=([],), producer=producer)  # results=[], then (specs,)
                published["finalize_only"] += 1
    return published


def redispatch(layout: Layout, live: LiveState, only: str | None = None) -> dict[str, int]:
    """Redis lost its data (restarted without persistence): the queued messages and
    chord counters are gone. Publish again every group that the results root says was
    submitted (it is in a manifest) and is neither finished nor given up (no FAILED or
    CANCELLED fold or group). Runs still training on a live worker are not repeated: the
    new delivery waits on their lease and reports their outcome. `only`: this experiment
    alone (a stalled one: orchestrator.cluster.stall)."""
    from .manifest import experiments, load_manifest

    total = {"runs": 0, "groups": 0, "finalize_only": 0}
    ended = {Status.FAILED.value, Status.CANCELLED.value}
    for name in [only] if only is not None else experiments(layout):
        try:
            manifest = load_manifest(layout, name)
            runs = [RunSpec.from_dict(r) for g in manifest.get("groups", []) for r in g.get("runs", [])]
        except Exception:  # an unreadable manifest is not this watchdog's to repair
            continue
        todo = []
        for p in make_plan(layout, runs):
            if p.action == SKIP:
                continue
            group = read_group_status(layout, p.first) or {}
            if group.get("train_status") in ended:
                continue
            if any(fold_state(layout, s)[0] in ended for s in p.specs):
                continue
            todo.append(p)
        if todo:
            live.set_runs(name, {s.run_id: Status.PENDING.value for p in todo for s in p.todo})
            counts = publish(todo, {s.run_id: s.to_dict() for p in todo for s in p.specs})
            total = {k: total[k] + counts[k] for k in total}
    return total


def unpark(experiment: str) -> list[str]:
    """Move every parked message of an experiment back to the queue its run belongs on
    (same body, headers and priority: same task id and chord). Returns their task ids."""
    moved: list[str] = []
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        producer = conn.Producer()
        while (message := channel.basic_get(keys.parked_queue(experiment), no_ack=False)) is not None:
            try:
                args = json.loads(message.body)[0]
                queue = RunSpec.from_dict(args[0]).queue
            except Exception:  # not a run message: drop it rather than loop on it
                log.error("dropping a parked message that is not a run: %r", message.body[:200])
                message.ack()
                continue
            producer.publish(message.body, routing_key=queue, exchange="",
                             headers=message.headers, content_type=message.content_type,
                             content_encoding=message.content_encoding,
                             priority=(message.properties or {}).get("priority"))
            message.ack()
            moved.append(str((message.headers or {}).get("id", "")))
    return moved
