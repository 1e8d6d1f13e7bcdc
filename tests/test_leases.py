"""Lease scripts against a real redis-server: the live IN_PROGRESS mark that goes with
a claim (one round trip at the start of each run)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from orchestrator import keys
from orchestrator.execution.leases import Leases
from orchestrator.keys import PROGRESS
from orchestrator.livestate import LiveState


@pytest.fixture
def leases(redis_url: str) -> Leases:
    return Leases(redis.Redis.from_url(redis_url), ttl=30)


def _mark(client: redis.Redis, exp: str, run_id: str) -> dict | None:
    raw = client.hget(keys.exp_runs(exp), run_id)
    return None if raw is None else json.loads(raw)


def test_begin_sets_the_live_mark_with_the_attempt_number_only_when_it_claims(leases: Leases) -> None:
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    entry = LiveState.run_entry(exp, run_id, "IN_PROGRESS", worker="cpu1@h")
    first = leases.begin(run_id, {"worker": "cpu1@h"}, exp, None, "task-1", entry)
    assert first.claim is not None and first.claim.attempt == 1
    mark = _mark(leases.client, exp, run_id)
    assert mark is not None
    assert (mark["status"], mark["worker"], mark["attempt"]) == ("IN_PROGRESS", "cpu1@h", 1)
    assert 0 < leases.client.ttl(keys.exp_runs(exp)) <= entry[3]

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

    leases.client.set(keys.paused(exp), "1")
    paused = leases.begin(run_id, {}, exp, None, "t2", LiveState.run_entry(exp, run_id, "IN_PROGRESS"))
    assert paused.paused and paused.claim is None
    assert _mark(leases.client, exp, run_id) is None


def test_begin_refuses_an_entry_it_cannot_extend(leases: Leases) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        leases.begin("r", {}, "e", None, "t", ("k", "f", "[1]", 10))


def _expire_lease(leases: Leases, run_id: str) -> None:
    """What a lapse looks like: the lease key gone, nothing else changed."""
    leases.client.delete(f"orch:lease:{run_id}")


def test_a_superseded_attempt_can_never_take_its_lease_back(leases: Leases) -> None:
    """The fencing invariant (orchestrator.execution.leases): once another attempt claimed the run,
    or the run was committed, the old attempt's renewals fail for good, whatever key
    expired or was released in between."""
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    a = leases.begin(run_id, {"worker": "a"}, exp, None, "t1").claim
    assert a is not None and a.attempt == 1
    # A's lease lapses, the watchdog revokes it, B claims, commits and releases.
    _expire_lease(leases, run_id)
    assert leases.revoke(run_id, a.token, why="lease lapsed")
    b = leases.claim(run_id, {"worker": "b"})
    assert not isinstance(b, dict) and b.attempt == 2 and b.lost == 1
    leases.finish(run_id, b.token, True, PROGRESS, None)
    assert not leases.client.exists(f"orch:lease:{run_id}") and leases.active().get(run_id) is None
    # A wakes: lease and active entry are both gone. It stays fenced.
    assert leases.probe(run_id, a.token, {"worker": "a"}, exp, a.attempt)[0] == 0
    assert not leases.client.exists(f"orch:lease:{run_id}")

    # Same without the watchdog's revoke (B claimed after a lapse, then failed and released).
    run2 = uuid.uuid4().hex
    a = leases.claim(run2, {"worker": "a"})
    _expire_lease(leases, run2)
    leases.client.hdel("orch:active", run2)
    b = leases.claim(run2, {"worker": "b"})
    assert not isinstance(a, dict) and not isinstance(b, dict)
    leases.finish(run2, b.token, False, PROGRESS, None)
    assert leases.probe(run2, a.token, {}, exp, a.attempt)[0] == 0

    # Committed, even by this very attempt number after the counter moved: fenced.
    run3 = uuid.uuid4().hex
    a = leases.claim(run3, {})
    assert not isinstance(a, dict)
    leases.client.hset(f"orch:attempts:{run3}", "committed", 1)
    _expire_lease(leases, run3)
    assert leases.probe(run3, a.token, {}, exp, a.attempt)[0] == 0


def test_a_lapse_nobody_acted_on_is_taken_back_also_after_redis_lost_its_data(leases: Leases) -> None:
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    a = leases.claim(run_id, {"worker": "a"})
    assert not isinstance(a, dict)
    assert leases.client.ttl(f"orch:attempts:{run_id}") == -1  # no expiry while in flight
    _expire_lease(leases, run_id)
    assert leases.probe(run_id, a.token, {"worker": "a"}, exp, a.attempt)[0] == 2
    assert leases.client.get(f"orch:lease:{run_id}") == a.token.encode()
    # Redis restarted without its data: every key gone. Taken back, counter restored.
    leases.client.delete(f"orch:lease:{run_id}", f"orch:attempts:{run_id}")
    leases.client.hdel("orch:active", run_id)
    assert leases.probe(run_id, a.token, {"worker": "a"}, exp, a.attempt)[0] == 2
    assert leases.attempts(run_id)["n"] == a.attempt
    # A duplicate delivery now waits on the live lease, and a later claim counts on.
    assert isinstance(leases.claim(run_id, {"worker": "b"}), dict)
    leases.finish(run_id, a.token, True, PROGRESS, None)
    assert 0 < leases.client.ttl(f"orch:attempts:{run_id}") <= 7 * 24 * 3600  # expires once ended


def test_renumber_moves_an_attempt_past_what_the_status_file_records(leases: Leases) -> None:
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    a = leases.claim(run_id, {})
    assert not isinstance(a, dict) and a.attempt == 1
    moved = leases.renumber(run_id, a, floor=3)
    assert moved.attempt == 4 and leases.attempts(run_id)["n"] == 4
    assert leases.renumber(run_id, moved, floor=1) == moved  # already above: unchanged
    assert leases.probe(run_id, moved.token, {}, exp, moved.attempt)[0] == 1
    leases.finish(run_id, moved.token, False, PROGRESS, None)
    b = leases.claim(run_id, {})
    assert not isinstance(b, dict) and b.attempt == 5
    # A claim that lost its lease is not renumbered.
    leases.client.delete(f"orch:lease:{run_id}")
    assert leases.renumber(run_id, b, floor=9).attempt == 5


def test_the_orphan_rule_hands_on_a_dead_takers_message_after_the_chord_claim_could_lapse(
        redis_url: str) -> None:
    """An unacknowledged message no attempt holds: handed on once its taker is known dead
    (no record, or a new process of its name up 10 s), never sooner than 10 s after
    delivery; a live taker's only after the grace of three leases."""
    import time

    from orchestrator.cluster import registry
    from orchestrator.cluster.watchdog import ORPHAN_GRACE_LEASES, TAKER_DEAD_FOR, OrphanRule

    client = redis.Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:6]
    now = time.time()

    def record(name: str, pid: int, started: float) -> None:
        registry.register(client, registry.WorkerRecord(
            name=name, host="h", pid=pid, gpu=None, device="cpu", queues=["cpu"], state="busy",
            started=started, heartbeat=now), ttl=60)

    alive, restarted, fresh = f"a{tag}@h", f"b{tag}@h", f"c{tag}@h"
    record(alive, 100, now - 600)
    record(restarted, 201, now - TAKER_DEAD_FOR - 1)  # the old process was pid 200
    record(fresh, 301, now - 2)  # restarted 2 s ago: pid 300 died at most 2 s before that

    rule = OrphanRule(client, lease_ttl=10)
    old = TAKER_DEAD_FOR + 0.5
    assert rule(old, [alive, 100]) is False  # alive: its message is its own
    assert rule(ORPHAN_GRACE_LEASES * 10, [alive, 100]) is True  # ... up to the grace
    assert rule(old, [restarted, 200]) is True
    assert rule(old, [fresh, 300]) is False  # Celery's chord claim may still stand
    assert rule(old, [f"gone{tag}@h", 400]) is True  # no record: it expired
    assert rule(TAKER_DEAD_FOR - 0.5, [f"gone{tag}@h", 400]) is False  # too soon after delivery
    for bad in (None, "x", [alive], [alive, "100"], [1, 100], [alive, True, 3]):
        assert rule(old, bad) is False, bad  # unknown taker: only the grace applies


def test_a_parked_run_is_noted_in_the_parked_index(leases: Leases) -> None:
    """begin() of a paused experiment's run notes the experiment in keys.PARKED in the
    same round trip: the watchdog reads that instead of walking the keyspace."""
    exp, run_id = f"exp-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    leases.client.set(keys.paused(exp), "1")
    before = time.time()
    assert leases.begin(run_id, {}, exp, None, "t1").paused
    assert before <= leases.parked()[exp] <= time.time()
    leases.forget_parked(exp)
    assert exp not in leases.parked()


_CHORE = """
import json, sys, time
import redis
from orchestrator import keys
from orchestrator.experiment.spec import DatasetRef, Resources, RunSpec
from tasks import app
from tasks.watchdog import PARKED_FORGET_SECONDS, unpark_unpaused

client = redis.Redis.from_url(sys.argv[1])
def spec(exp):
    return RunSpec(experiment=exp, trainer="prior", trainer_version="1",
                   dataset=DatasetRef(name="iris", source="sklearn"), params={}, seed=0, fold=0, k=2,
                   validation=None, holdout=0.2, output=f"{exp}/iris", point="base",
                   resources=Resources(gpus=0)).to_dict()
for exp in ("back", "still_paused"):
    app.send_task("tasks.train_run", args=[spec(exp)], queue=keys.parked_queue(exp))
client.hset(keys.PARKED, mapping={"back": time.time(), "still_paused": time.time(),
                                  "old": time.time() - PARKED_FORGET_SECONDS - 1})
client.set(keys.paused("still_paused"), "1")
done = unpark_unpaused()
print(json.dumps({"done": done, "cpu": client.llen("cpu"), "index": sorted(k.decode() for k in client.hkeys(keys.PARKED)),
                  "parked": {e: client.llen(keys.parked_queue(e)) for e in ("back", "still_paused")}}))
"""


def test_the_watchdog_unparks_from_the_index_and_forgets_old_entries(private_redis: str) -> None:
    """The watchdog's chore moves back the parked runs of an experiment that is not
    paused (found through the index), leaves a paused one's, and drops an index entry
    whose queue is empty and whose last park is old."""
    import subprocess
    import sys

    from .conftest import REPO, cli_env

    proc = subprocess.run([sys.executable, "-c", _CHORE, private_redis], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=cli_env(ORCH_BROKER_URL=private_redis))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["done"] == ["back: 1 parked runs back on their queues (not paused)"]
    assert out["cpu"] == 1 and out["parked"] == {"back": 0, "still_paused": 1}
    assert out["index"] == ["back", "still_paused"]  # "old" forgotten; "back" parked just now
