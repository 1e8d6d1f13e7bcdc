"""Lease scripts against a real redis-server: the live IN_PROGRESS mark that goes with
a claim (one round trip at the start of each run)."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from orchestrator.leases import Leases, pause_key
from orchestrator.livestate import PROGRESS, LiveState, runs_key


@pytest.fixture
def leases(redis_url: str) -> Leases:
    return Leases(redis.Redis.from_url(redis_url), ttl=30)


def _mark(client: redis.Redis, exp: str, run_id: str) -> dict | None:
    raw = client.hget(runs_key(exp), run_id)
    return None if raw is None else json.loads(raw)


def test_begin_sets_the_live_mark_with_the_attempt_number_only_when_it_claims(leases: Leases) -> None:
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    entry = LiveState.run_entry(exp, run_id, "IN_PROGRESS", worker="cpu1@h")
    first = leases.begin(run_id, {"worker": "cpu1@h"}, exp, None, "task-1", entry)
    assert first.claim is not None and first.claim.attempt == 1
    mark = _mark(leases.client, exp, run_id)
    assert mark is not None
    assert (mark["status"], mark["worker"], mark["attempt"]) == ("IN_PROGRESS", "cpu1@h", 1)
    assert 0 < leases.client.ttl(runs_key(exp)) <= entry[3]

    # A duplicate delivery while the lease is held: no claim, the mark is left alone.
    other = LiveState.run_entry(exp, run_id, "IN_PROGRESS", worker="cpu2@h")
    held = leases.begin(run_id, {"worker": "cpu2@h"}, exp, None, "task-2", other)
    assert held.claim is None and held.holder is not None
    assert _mark(leases.client, exp, run_id)["worker"] == "cpu1@h"

    leases.finish(run_id, first.claim.token, False, PROGRESS, None)
    again = leases.begin(run_id, {"worker": "cpu2@h"}, exp, None, "task-3", other)
    assert again.claim is not None and again.claim.attempt == 2
    assert (_mark(leases.client, exp, run_id)["worker"], _mark(leases.client, exp, run_id)["attempt"]) == ("cpu2@h", 2)


def test_begin_without_an_entry_or_when_paused_sets_no_mark(leases: Leases) -> None:
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    start = leases.begin(run_id, {}, exp, None, "t1")
    assert start.claim is not None
    assert _mark(leases.client, exp, run_id) is None
    leases.finish(run_id, start.claim.token, False, PROGRESS, None)

    leases.client.set(pause_key(exp), "1")
    paused = leases.begin(run_id, {}, exp, None, "t2", LiveState.run_entry(exp, run_id, "IN_PROGRESS"))
    assert paused.paused and paused.claim is None
    assert _mark(leases.client, exp, run_id) is None


def test_begin_refuses_an_entry_it_cannot_extend(leases: Leases) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        leases.begin("r", {}, "e", None, "t", ("k", "f", "[1]", 10))
