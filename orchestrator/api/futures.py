"""Evaluations as futures: `RunFuture` (one evaluation: one group of runs, by default a
single train/validation split, so one run), `RunResult` (its metrics) and
`as_completed`.

A future is only an id and where its files are: its state is read from the results
root (the group's status.json, written by the group's finalize), so a future made by a
new client, in a new process, sees the same evaluation as the one that submitted it.
The cluster's live state (Redis) only tells which groups to read now.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..collect.status import Status
from ..errors import EvaluationError
from ..experiment.spec import RunSpec

if TYPE_CHECKING:
    from .session import Session

FINAL = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)
# Between two reads of every pending future's status file (the live state may be gone:
# its keys expire, a Redis restarted without its data).
FILE_CHECK_SECONDS = 5.0


@dataclass(frozen=True)
class RunResult:
    """What an evaluation scored (its group's finalize: orchestrator.collect.finalize).

    `metrics`: accuracy, log_loss, macro_f1 of the validation predictions (out of fold
    with k folds); `holdout`: the same for the fold models' ensemble on the holdout rows
    (empty with holdout 0). `dir`: the group's folder (fold_<i>/, ensemble/, status/).
    """

    id: str
    name: str
    experiment: str
    params: dict[str, Any]
    run_ids: tuple[str, ...]
    metrics: dict[str, float]
    holdout: dict[str, float]
    dir: Path

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])


@dataclass
class RunFuture:
    """One evaluation on the cluster (`Client.evaluate`), like concurrent.futures.Future.

    `id` is its group_id, a content hash of the trainer and its version, the dataset,
    the params, the seed and the split: the same evaluation has the same id in every
    process, and `Client.future(id)` finds it again.
    """

    client: Session = field(repr=False)
    specs: tuple[RunSpec, ...] = field(repr=False)
    _result: RunResult | None = field(default=None, repr=False)
    _record: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.specs[0].group_id

    @property
    def name(self) -> str:
        return self.specs[0].group_name

    @property
    def experiment(self) -> str:
        return self.specs[0].experiment

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.specs[0].params)

    @property
    def run_ids(self) -> tuple[str, ...]:
        return tuple(s.run_id for s in self.specs)

    def __repr__(self) -> str:
        return f"RunFuture({self.id!r}, {self.name!r}, state={self.state()!r})"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFuture) and other.id == self.id and other.experiment == self.experiment

    def record(self) -> dict[str, Any] | None:
        """The group's status.json if it is final for exactly these runs, else None."""
        if self._record is None:
            from ..collect.status import read_group_status

            record = read_group_status(self.client.layout, self.specs[0])
            if (record and record.get("run_ids") == sorted(self.run_ids)
                    and record.get("train_status") in FINAL):
                self._record = record
        return self._record

    def state(self) -> str:
        """DONE, FAILED or CANCELLED once finished; else IN_PROGRESS or PENDING (from the
        folds' status files)."""
        record = self.record()
        if record is not None:
            return str(record["train_status"])
        from ..collect.status import fold_state

        states = {fold_state(self.client.layout, s)[0] for s in self.specs}
        return Status.IN_PROGRESS.value if states - {Status.PENDING.value, "NEW"} else Status.PENDING.value

    def done(self) -> bool:
        """Whether it finished (DONE, FAILED or CANCELLED)."""
        return self.record() is not None

    def cancelled(self) -> bool:
        return self.state() == Status.CANCELLED.value

    def running(self) -> bool:
        return self.state() == Status.IN_PROGRESS.value

    def cancel(self) -> bool:
        """Cancel it if none of its runs has started: True if it is (now) CANCELLED,
        False if it is training or finished. Evaluating it again runs it after all."""
        if self.done():
            return self.cancelled()
        from ..dispatch.steering import cancel_queued

        leases, live, url = self.client.steering()
        with self.client.redis_errors(url):
            counts = cancel_queued(self.client.layout, self.experiment, [list(self.specs)], leases, live)
        self._record = None
        return counts["running"] == 0 and self.cancelled()

    def result(self, timeout: float | None = None) -> RunResult:
        """Its RunResult, waiting for it up to `timeout` seconds (None: as long as it
        takes): TimeoutError then (the evaluation goes on), EvaluationError if it ended
        FAILED or CANCELLED (with each fold's error)."""
        if self._result is None:
            if not self.done():
                for _ in as_completed([self], timeout=timeout):
                    pass
            record = self.record()
            assert record is not None
            if record["train_status"] != Status.DONE.value:
                failed = {str(k): str(v) for k, v in (record.get("failed") or {}).items()}
                why = "; ".join(f"{'fold ' + k if k.isdigit() else k}: {v}" for k, v in failed.items())
                raise EvaluationError(f"evaluation {self.name} ({self.id}) ended {record['train_status']}"
                                      + (f": {why}" if why else ""), str(record["train_status"]), failed)
            metrics = record.get("metrics") or {}
            self._result = RunResult(
                id=self.id, name=self.name, experiment=self.experiment, params=self.params,
                run_ids=self.run_ids, metrics=dict(metrics.get("oof") or {}),
                holdout=dict(metrics.get("ensemble_holdout") or {}),
                dir=self.client.layout.group_dir(self.specs[0]))
        return self._result

    def exception(self, timeout: float | None = None) -> EvaluationError | None:
        """The EvaluationError that result() would raise, or None when it is DONE."""
        try:
            self.result(timeout)
        except EvaluationError as exc:
            return exc
        return None


def as_completed(futures: Iterable[RunFuture], timeout: float | None = None) -> Iterator[RunFuture]:
    """Yield each future as it finishes (DONE, FAILED or CANCELLED), those already
    finished first; TimeoutError if some are still pending after `timeout` seconds.

    Example (an outside optimiser: ask, evaluate on the cluster, tell)::

        pending = {client.evaluate("mlp", {"lr": lr}, "iris") for lr in (0.1, 0.01)}
        for future in orch.as_completed(pending):
            print(future.params, future.result().accuracy)
    """
    from ..views.progress import poll_interval

    pending: dict[tuple[str, str], RunFuture] = {}
    for f in futures:
        pending.setdefault((f.experiment, f.id), f)
    start = time.monotonic()
    last_files = start
    first = True
    while pending:
        now = time.monotonic()
        if first or now - last_files >= FILE_CHECK_SECONDS:
            candidates = list(pending)  # every status file
            last_files = now
        else:
            candidates = _finished_live(pending)
        first = False
        for key in candidates:
            future = pending[key]
            if future.done():
                del pending[key]
                yield future
        if not pending:
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{len(pending)} of the evaluations did not finish in {timeout:g} s "
                               "(they go on; wait again)")
        for future in pending.values():  # a dead local worker: say so rather than wait
            future.client.check_cluster()
            break
        time.sleep(poll_interval(time.monotonic() - start))


def _finished_live(pending: dict[tuple[str, str], RunFuture]) -> list[tuple[str, str]]:
    """The pending futures whose groups the live state says are final (one read of each
    experiment's groups hash); none when there is no broker or it does not answer."""
    from redis.exceptions import RedisError

    by_client: dict[int, tuple[Session, dict[str, list[tuple[str, str]]]]] = {}
    for key, future in pending.items():
        by_client.setdefault(id(future.client), (future.client, {}))[1].setdefault(key[0], []).append(key)
    found: list[tuple[str, str]] = []
    for client, experiments in by_client.values():
        live = client.live_or_none()
        if live is None:
            continue
        for experiment, keys in experiments.items():
            try:
                groups = live.groups(experiment)
            except RedisError:
                continue
            found.extend(k for k in keys if groups.get(k[1]) in FINAL)
    return found
