"""Training workers with --max-tasks-per-child run the pool's maintenance every 0.2 s
(tasks/respawn.py), so a finished run's process is replaced at once instead of at the
pool's 5-second timer when its exit was noticed too early."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tasks import app
from tasks.respawn import INTERVAL_SECONDS, PromptRespawn


class Hub:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Any]] = []

    def call_repeatedly(self, seconds: float, fn: Any) -> None:
        self.timers.append((seconds, fn))


def worker(max_tasks: int | None) -> SimpleNamespace:
    pool = SimpleNamespace(maintain_pool=lambda: None)
    return SimpleNamespace(max_tasks_per_child=max_tasks, hub=Hub(), pool=SimpleNamespace(_pool=pool))


def test_the_step_is_part_of_every_worker() -> None:
    assert PromptRespawn in app.steps["worker"]


def test_a_worker_that_recycles_processes_maintains_its_pool_often() -> None:
    w = worker(1)
    step = PromptRespawn(w)
    assert step.enabled
    step.start(w)
    assert w.hub.timers == [(INTERVAL_SECONDS, w.pool._pool.maintain_pool)]
    assert INTERVAL_SECONDS <= 0.5


def test_a_worker_that_keeps_its_processes_is_left_alone() -> None:
    assert not PromptRespawn(worker(None)).enabled
