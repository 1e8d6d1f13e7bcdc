"""Evaluators score every published version, in order, each once (docs/roles.md).

Each evaluator instance `i` of `n` owns the versions whose number is `i` modulo `n` and
keeps a cursor in Redis: the last version it recorded (hash `orch:roles:<exp>:cursor`,
field: its instance key). Its loop takes the oldest listed version of its own above the
cursor, scores it, and records it in one script that

- checks that the evaluator's lease still holds its token (a zombie evaluator records
  nothing and moves no cursor),
- checks that the version is above the cursor (a version is recorded once),
- writes the scores (hash `orch:roles:<exp>:evals`), moves the cursor, releases the
  version's pin (orchestrator.roles.weights: a version published while the experiment
  has evaluators is kept until it is scored) and marks the best version.

A restarted evaluator reads its cursor and goes on from the next version: nothing
recorded is scored again, nothing is skipped (a version it was scoring when it died has
no record, so it is scored again, once recorded). Versions are published in increasing
order (the flip refuses a version not newer than the pointer), so a version appearing
later is always above every cursor. When the experiment ends at the learner's step
budget, each evaluator scores what it still owes (at most `weights.unscored` versions)
before it stops; on `cancel` it stops at once and the pins stay until a new submission.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import redis

from . import rkeys
from .weights import Fenced, Version, WeightStore

# KEYS[1] the evaluator's lease, KEYS[2] cursors, KEYS[3] evals, KEYS[4] the unscored zset,
# KEYS[5] best. ARGV[1] token, ARGV[2] cursor field, ARGV[3] version, ARGV[4] scores JSON,
# ARGV[5] score for the best ('' : none). Returns 0 fenced, -1 already recorded (not above
# the cursor), 1 recorded, 2 recorded and now the best.
_RECORD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local v = tonumber(ARGV[3])
if v <= tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') then return -1 end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[3])
if ARGV[5] == '' then return 1 end
local b = redis.call('GET', KEYS[5])
if b then
  local ok, p = pcall(cjson.decode, b)
  if ok and tonumber(p['score']) and tonumber(p['score']) >= tonumber(ARGV[5]) then return 1 end
end
redis.call('SET', KEYS[5], cjson.encode({version = v, score = tonumber(ARGV[5])}))
return 2
"""


class Scoreboard:
    """The evaluators' records and cursors of one experiment."""

    def __init__(self, client: redis.Redis, experiment: str):
        self.client, self.experiment = client, experiment
        self._record = client.register_script(_RECORD)

    def cursor(self, instance: str) -> int:
        """The last version `instance` recorded (0: none yet)."""
        raw = cast(bytes | None, self.client.hget(rkeys.cursors(self.experiment), instance))
        return int(raw) if raw else 0

    def cursors(self) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], self.client.hgetall(rkeys.cursors(self.experiment)))
        return {k.decode(): int(v) for k, v in raw.items()}

    def record(self, store: WeightStore, instance: str, lease_key: str, token: str, version: int,
               scores: dict[str, Any], best_score: float | None = None) -> bool:
        """Record `scores` of `version` and move `instance`'s cursor to it, under the lease
        `lease_key` holding `token`; True if it became the best version. Raises Fenced
        (nothing recorded) when the lease is not the token's, ValueError when the version
        is not above the cursor."""
        code = int(cast(int, self._record(
            keys=[lease_key, rkeys.cursors(self.experiment), rkeys.evals(self.experiment), store.unscored_key,
                  f"{store.prefix}:best"],
            args=[token, instance, int(version), json.dumps(scores), "" if best_score is None else float(best_score)])))
        if code == 0:
            raise Fenced(f"version {version} not recorded: the lease {lease_key} is not this evaluator's")
        if code == -1:
            raise ValueError(f"version {version} is not above the cursor of {instance}: recorded already")
        return code == 2


def owed(listed: Iterable[int], cursor: int, index: int, count: int) -> list[int]:
    """The versions evaluator `index` of `count` still owes, oldest first."""
    return sorted(v for v in listed if v > cursor and v % count == index)


Score = Callable[[Version], tuple[dict[str, Any], float | None]]


class EvaluatorContext(Protocol):
    """What `evaluate_each` uses of orchestrator.roles.instance.RoleContext."""

    weights: WeightStore

    @property
    def instance(self) -> str: ...

    def stop_why(self) -> str | None: ...

    def running(self) -> bool: ...

    def beat(self, state: str = "running", **stats: Any) -> None: ...

    def eval_cursor(self) -> int: ...

    def eval_slot(self) -> tuple[int, int]: ...

    def record_eval(self, version: int, scores: dict[str, Any], best_score: float | None = None) -> bool: ...


def evaluate_each(ctx: EvaluatorContext, score: Score, wait_s: float = 1.0) -> int:
    """Score every version this evaluator owes, in order, until the experiment is
    cancelled or the attempt fenced, or (ended at the learner's step budget) nothing is
    owed any more. `score(version)` returns (the row recorded, the score that competes
    for the best version or None). Returns how many versions this attempt recorded."""
    index, count = ctx.eval_slot()
    cursor = ctx.eval_cursor()
    recorded = 0
    while True:
        why = ctx.stop_why()
        draining = why is not None and why.startswith("ended")
        if why is not None and not draining:
            return recorded
        todo = owed(ctx.weights.versions(), cursor, index, count)
        state = "scoring after the end" if draining else "running"
        ctx.beat(state, evaluated=recorded, version=cursor, behind=len(todo))
        if not todo:
            if draining:
                return recorded
            ctx.weights.wait_newer(ctx.weights.latest(), timeout=wait_s, stop=lambda: not ctx.running())
            continue
        version = ctx.weights.fetch(todo[0])
        if version is None:
            continue  # pruned: it was never held for an evaluator; the next listing lacks it
        row, best_score = score(version)
        ctx.record_eval(version.number, row, best_score)
        cursor = version.number
        recorded += 1
