"""A group's end, as plain Python: the chord body (`finalize`) and its error callback
(`group_failed`) of each group, from their untrusted messages to the group's records.
`tasks.finalize` and `tasks.group_failed` are thin wrappers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import redis

from ..errors import InvalidSpecError, UnknownTrainerError
from ..execution.attempt import Delivery, refuse
from ..execution.returns import Returns, collect
from ..experiment.spec import RunSpec
from ..livestate import LiveState
from ..outage import OUTAGE_RETRIES, is_outage, wait_for_redis
from ..paths import Layout
from ..trainers import get_trainer
from .finalize import FoldStates, finalize_group, fold_states, group_paths, mark_group_failed
from .status import FoldPaths

log = logging.getLogger(__name__)


def group_specs(specs: Any, folds: Any = None) -> list[RunSpec]:
    """The group's specs, parsed strictly (RunSpec.from_dict). As the canvas sends them
    (`folds` given): one spec, and the folds of the group, which differ from it in their
    fold alone. Else (older messages, direct calls): every fold's spec."""
    if not isinstance(specs, list) or not specs:
        raise InvalidSpecError("specs must be a non-empty list of run specs")
    if folds is not None:
        if len(specs) != 1:
            raise InvalidSpecError("with folds, specs must be a list of one run spec")
        first = RunSpec.from_dict(specs[0])
        if (not isinstance(folds, list) or not folds
                or not all(type(f) is int and 0 <= f < first.n_folds for f in folds)
                or len(set(folds)) != len(folds)):
            raise InvalidSpecError(f"folds must be a non-empty list of distinct fold numbers "
                                   f"0..{first.n_folds - 1}, got {folds!r}")
        return [dataclasses.replace(first, fold=f) for f in folds]
    parsed = [RunSpec.from_dict(data) for data in specs]
    if len({s.group_id for s in parsed}) != 1:
        raise InvalidSpecError("specs of one group must share their group_id")
    return parsed


@dataclasses.dataclass
class GroupEnd:
    """What a group callback works with (made once per control worker process)."""

    layout: Layout
    live: LiveState
    returns: Returns
    return_max_bytes: int

    def accept(self, specs: Any, folds: Any, delivery: Delivery) -> list[RunSpec]:
        """A group callback's specs; refused (dead letters, the error raised, nothing
        written) unless they parse strictly and name a trainer registered here: the
        control worker runs the same installation as the training workers."""
        try:
            group = group_specs(specs, folds)
            get_trainer(group[0].trainer)
        except (UnknownTrainerError, InvalidSpecError) as exc:
            refuse(self.live.client, delivery, exc, {"specs": specs, "folds": folds})
            raise
        return group

    def collect(self, group: list[RunSpec], paths: list[FoldPaths] | None = None) -> FoldStates:
        """What return-mode workers left in Redis, under the results root. Returns each
        fold's state and record as they are on disk now (one read of each status file
        when there was nothing to collect: the shared-root case). `paths`:
        finalize.group_paths of the group, if the caller has them."""
        states = fold_states(self.layout, group, paths)
        if collect(self.layout, group, self.returns, self.return_max_bytes, states):
            states = fold_states(self.layout, group, paths)  # it wrote something: read again
        return states

    def finalize(self, specs: Any, folds: Any, delivery: Delivery) -> dict[str, Any]:
        """Chord body: ensemble outputs, final_results.csv rows, status.json DONE.

        A Redis outage (Redis restarting) is not the group's failure: the finalize waits
        for Redis and runs again (it is idempotent: under the group's lock, a group
        found DONE is not written twice), up to OUTAGE_RETRIES times; an outage that
        outlasts that raises without marking the group FAILED (a search's step adopts
        it, `run`/`submit` again finalizes it)."""
        group = self.accept(specs, folds, delivery)
        for tries in range(OUTAGE_RETRIES + 1):
            lock = self.live.finalizing(group[0].experiment, group[0].group_id)  # one finalize of a group at a time
            token = None
            try:
                with lock:
                    token = lock.local.token
                    paths = group_paths(self.layout, group)  # built once, for collect and finalize
                    record = finalize_group(self.layout, group, self.live, self.collect(group, paths), paths)
                break
            except Exception as exc:
                if is_outage(exc):
                    if tries < OUTAGE_RETRIES and wait_for_redis(self.live.client):
                        log.warning("%s: Redis did not answer the finalize (%s); finalizing again",
                                    group[0].group_name, exc)
                        if token is not None:  # its release failed: the lock, still ours, kept by Redis
                            lock.local.token = token
                            with contextlib.suppress(redis.RedisError):
                                lock.release()
                        continue
                    raise
                # Recorded here, with its reason: the chord error callback only learns a task id.
                mark_group_failed(self.layout, group, reason=f"{type(exc).__name__}: {exc}", live=self.live)
                raise
        return {"group_id": record["group_id"], "train_status": record["train_status"]}

    def failed(self, specs: Any, folds: Any, delivery: Delivery) -> dict[str, Any]:
        """Chord error callback: status.json FAILED with which folds failed and why."""
        group = self.accept(specs, folds, delivery)
        states = None
        try:  # the folds that did finish count, and the errors of those that did not
            states = self.collect(group)
        except Exception:
            log.exception("%s: collecting returned outputs failed", group[0].group_name)
        record = mark_group_failed(self.layout, group, live=self.live, states=states)
        return {"group_id": record["group_id"], "train_status": record["train_status"],
                "failed": record["failed"]}
