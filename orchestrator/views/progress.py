"""Waiting for submitted experiments: a progress bar from Redis live state, then a
summary read from the status files (the record)."""

from __future__ import annotations

import functools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..collect.status import Status
from ..errors import EnvironmentProblem
from ..experiment.plan import GroupPlan
from ..livestate import LiveState

FINAL_GROUP = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)
# Redis restarting or briefly unreachable: keep polling this long before giving up.
REDIS_PATIENCE_SECONDS = 300.0


@dataclass
class Tracked:
    experiment: str
    plans: list[GroupPlan]

    @functools.cached_property
    def run_ids(self) -> frozenset[str]:
        return frozenset(s.run_id for p in self.plans for s in p.specs)

    @functools.cached_property
    def group_ids(self) -> frozenset[str]:
        return frozenset(p.first.group_id for p in self.plans)


def counts(live: LiveState, tracked: list[Tracked]) -> tuple[Counter[str], int, int]:
    """(run states, groups finished, groups in all) over every tracked experiment."""
    poller = Poller(live, tracked)
    return poller.poll()


class Poller:
    """Counts for a progress display, cheap enough to ask for five times a second.

    Whether every group is final (what ends a wait) is read from the small groups hash
    at every poll. The run states (what the bar shows) come from the runs hash, one value
    per run: re-read at most every `runs_every` seconds, and whenever the groups hash
    says every group is final, so that the last counts shown are exact.
    """

    def __init__(self, live: LiveState, tracked: list[Tracked], runs_every: float = 1.0):
        self.live = live
        self.tracked = tracked
        self.runs_every = runs_every
        self._states: Counter[str] | None = None
        self._states_at = 0.0

    def _run_states(self) -> Counter[str]:
        states: Counter[str] = Counter()
        for t in self.tracked:
            runs = self.live.run_statuses(t.experiment)
            pending = len(t.run_ids)
            for rid, status in runs.items():
                if rid in t.run_ids:
                    states[status] += 1
                    pending -= 1
            states[Status.PENDING.value] += pending
        return states

    def poll(self) -> tuple[Counter[str], int, int]:
        """(run states, groups finished, groups in all); raises redis.RedisError."""
        finished = total = 0
        for t in self.tracked:
            groups = self.live.groups(t.experiment)
            finished += sum(1 for g in t.group_ids if groups.get(g) in FINAL_GROUP)
            total += len(t.group_ids)
        now = time.monotonic()
        if self._states is None or finished == total or now - self._states_at >= self.runs_every:
            self._states = self._run_states()
            self._states_at = now
        return Counter(self._states), finished, total


def poll_interval(waited: float) -> float:
    """Seconds between two polls of a wait that has lasted `waited` seconds: 50 ms at
    first, so that the end of a short experiment is seen at once; 1% of the time waited
    later, at most one second, so that a long wait on a big experiment does not read its
    groups hash many times a second (about 0.1 ms of CPU per poll for 200 groups)."""
    return min(1.0, max(0.05, waited / 100))


class NotebookLine:
    """The progress in a Jupyter notebook without ipywidgets, where rich's live bar shows
    nothing (it needs them): one output, updated in place through IPython's display ids."""

    WIDTH = 24

    def __init__(self) -> None:
        from IPython.display import display

        self.handle = display({"text/plain": "training: starting"}, raw=True, display_id=True)

    def show(self, done: int, failed: int, running: int, total: int, eta: str) -> None:
        filled = round(self.WIDTH * (done + failed) / total) if total else self.WIDTH
        self.handle.update({"text/plain": f"training {'█' * filled}{'░' * (self.WIDTH - filled)} "
                                          f"{done + failed}/{total} runs ({done} done, {failed} failed, "
                                          f"{running} running), ETA {eta}"}, raw=True)


def _notebook_line(console: Console) -> NotebookLine | None:
    """A NotebookLine when `console` is in a notebook that lacks ipywidgets, else None."""
    if not console.is_jupyter:
        return None
    try:
        import ipywidgets  # noqa: F401  (rich's own Jupyter display works with it)
    except ImportError:
        return NotebookLine()
    return None


def wait(live: LiveState, tracked: list[Tracked], console: Console,
         check: Callable[[], None] | None = None,
         poll: Callable[[float], float] = poll_interval, lines: bool = True) -> None:
    """Block until every tracked group is DONE, FAILED or CANCELLED. `check` may raise to
    abort; Redis errors are retried for REDIS_PATIENCE_SECONDS. `poll`: the seconds to
    sleep between polls, given the seconds waited so far. The progress is a live bar on
    a terminal or in a notebook (Jupyter), else a line on stderr every 5 s (`lines`)."""
    start = time.monotonic()
    already = None
    lost_since: float | None = None
    notebook = _notebook_line(console)
    interactive = console.is_terminal or (console.is_jupyter and notebook is None)
    last_line = 0.0
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} runs"),
               TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                          "[yellow]{task.fields[running]} running[/]"),
               TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}")]
    poller = Poller(live, tracked)
    with Progress(*columns, console=console, disable=not interactive, transient=False) as bar:
        task = bar.add_task("training", total=sum(len(t.run_ids) for t in tracked),
                            done=0, failed=0, running=0, eta="?")
        while True:
            if check is not None:
                check()
            try:
                states, finished, total = poller.poll()
                lost_since = None
            except redis.RedisError as exc:  # Redis restarting? wait for it, with backoff
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    console.print(f"lost the connection to Redis ({exc}); retrying")
                if now - lost_since > REDIS_PATIENCE_SECONDS:
                    raise EnvironmentProblem(f"lost the connection to Redis for "
                                             f"{REDIS_PATIENCE_SECONDS:.0f} s: {exc}") from exc
                time.sleep(min(5.0, 0.5 * 2 ** min(6, int(now - lost_since))))
                continue
            done = states[Status.DONE.value]
            failed = states[Status.FAILED.value] + states[Status.CANCELLED.value]
            running = states[Status.IN_PROGRESS.value]
            if already is None:
                already = done
            elapsed = time.monotonic() - start
            rate = (done - already) / elapsed if elapsed > 0 else 0
            remaining = sum(states.values()) - done - failed
            eta = "0s" if not remaining else f"{remaining / rate:.0f}s" if rate > 0 else "?"
            bar.update(task, completed=done + failed, done=done, failed=failed,
                       running=running, eta=eta)
            if notebook is not None:
                notebook.show(done, failed, running, sum(states.values()), eta)
            if lines and not interactive and notebook is None and (time.monotonic() - last_line > 5 or finished == total):
                print(f"progress: {done + failed}/{sum(states.values())} runs "
                      f"({done} done, {failed} failed, {running} running), "
                      f"groups {finished}/{total}, ETA {eta}", file=sys.stderr, flush=True)
                last_line = time.monotonic()
            if finished == total:
                return
            time.sleep(poll(time.monotonic() - start))
