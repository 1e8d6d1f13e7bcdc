"""What is happening now, in Redis: run and group states per experiment.

Files under the results root are the record; these keys are a fast view of it for
progress bars and `watch`. Keys expire a week after their last write.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from . import keys
from .keys import PROGRESS

TTL_SECONDS = 7 * 24 * 3600
# How long a group's finalize may hold its lock: a group of 100 folds finalizes in ~1 s.
FINALIZE_LOCK_SECONDS = 120






def json_hash(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """A Redis hash of JSON values, decoded; a value that is not JSON is skipped."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        try:
            found[key.decode()] = json.loads(value)
        except ValueError:
            continue
    return found


_STATUS_PREFIX = b'{"status": "'  # how json.dumps starts every run value written here


def status_of(value: bytes) -> str | None:
    """The "status" of a run's JSON value; None if it has none (or is not JSON).

    Every writer (`run_entry`, `set_runs`) puts "status" first, so the status is read
    from the start of the value; anything else (an escape in it, another writer's
    layout) is decoded in full."""
    if value.startswith(_STATUS_PREFIX):
        end = value.find(b'"', len(_STATUS_PREFIX))
        if end > 0:
            status = value[len(_STATUS_PREFIX):end]
            if b"\\" not in status:
                return status.decode()
    try:
        data = json.loads(value)
    except ValueError:
        return None
    found = data.get("status") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


class LiveState:
    def __init__(self, client: redis.Redis):
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> LiveState:
        return cls(keys.client(url))

    @staticmethod
    def run_entry(experiment: str, run_id: str, status: str, **info: Any) -> tuple[str, str, str, int]:
        """(hash key, field, value, ttl) of a run's state: what set_run writes, for a caller
        that writes it in a round trip of its own."""
        return keys.exp_runs(experiment), run_id, json.dumps({"status": status, "t": time.time(), **info}), TTL_SECONDS

    def set_run(self, experiment: str, run_id: str, status: str, **info: Any) -> None:
        key, field, value, ttl = self.run_entry(experiment, run_id, status, **info)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, field, value)
        pipe.expire(key, ttl)
        pipe.execute()

    def set_runs(self, experiment: str, statuses: dict[str, str]) -> None:
        if not statuses:
            return
        now = time.time()
        mapping = {rid: json.dumps({"status": st, "t": now}) for rid, st in statuses.items()}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.exp_runs(experiment), mapping=mapping)
        pipe.expire(keys.exp_runs(experiment), TTL_SECONDS)
        pipe.execute()

    def set_group(self, experiment: str, group_id: str, status: str) -> None:
        self.set_groups(experiment, {group_id: status})

    def set_groups(self, experiment: str, statuses: dict[str, str]) -> None:
        if not statuses:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(keys.exp_groups(experiment), mapping=statuses)
        pipe.expire(keys.exp_groups(experiment), TTL_SECONDS)
        pipe.execute()

    def set_progress(self, run_id: str, report: dict[str, Any]) -> None:
        self.client.hset(PROGRESS, run_id, json.dumps(report, default=str))

    def clear_progress(self, run_id: str) -> None:
        self.client.hdel(PROGRESS, run_id)

    def progress(self) -> dict[str, dict[str, Any]]:
        """run_id -> {"t": unix time, "worker", "name", "experiment", and what the
        trainer reported last: epoch, step, metrics...} for every run training now."""
        return json_hash(cast(dict[bytes, bytes], self.client.hgetall(PROGRESS)))

    def finalizing(self, experiment: str, group_id: str) -> Any:
        """A lock (a context manager) that one finalize of a group holds while it reads
        the folds and writes the group's outputs. Two finalizes of one group (the chord
        body, and a finalize-only task that a client published while that body was on its
        way) then write one after the other: the second finds the group DONE and writes
        nothing. It expires after FINALIZE_LOCK_SECONDS, should its holder die; a waiter
        that cannot take it in that time raises (the task is retried)."""
        return self.client.lock(keys.group_finalizing(experiment, group_id), timeout=FINALIZE_LOCK_SECONDS,
                                blocking_timeout=FINALIZE_LOCK_SECONDS + 10, sleep=0.05)

    def count_finalize(self, experiment: str, group_id: str) -> int:
        """One more finalize that wrote a group's outputs (for audits: normally 1)."""
        key = keys.group_finalized(experiment, group_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, TTL_SECONDS)
        return int(pipe.execute()[0])

    def clear_groups(self, experiment: str, group_ids: list[str]) -> None:
        if group_ids:
            self.client.hdel(keys.exp_groups(experiment), *group_ids)

    def snapshot(self, experiment: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """(runs, groups) of an experiment in one round trip: what a progress poll reads."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.exp_runs(experiment))
        pipe.hgetall(keys.exp_groups(experiment))
        runs, groups = cast(list[dict[bytes, bytes]], pipe.execute())
        return ({k.decode(): json.loads(v) for k, v in runs.items()},
                {k.decode(): v.decode() for k, v in groups.items()})

    def run_statuses(self, experiment: str) -> dict[str, str]:
        """run_id -> status of an experiment's runs: what a progress count needs, without
        decoding each run's whole JSON value (see `status_of`)."""
        raw = cast(dict[bytes, bytes], self.client.hgetall(keys.exp_runs(experiment)))
        found: dict[str, str] = {}
        for key, value in raw.items():
            status = status_of(value)
            if status is not None:
                found[key.decode()] = status
        return found

    def runs(self, experiment: str) -> dict[str, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(keys.exp_runs(experiment)))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def groups(self, experiment: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(keys.exp_groups(experiment)))
        return {k.decode(): v.decode() for k, v in raw.items()}
