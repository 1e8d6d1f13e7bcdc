"""`orchestrator watch`: what the cluster is doing now, as one screen.

Two halves, so that the screen can be tested without Redis:

- `Collector.collect()` reads Redis (run and group states, run leases, trainer progress,
  the worker registry) and the results root (manifests, pause markers) into a
  `Snapshot` of plain dataclasses. It never talks to Flower or Celery.
- `render(snapshot, width, height)` turns a snapshot into a rich renderable that fits
  `width` columns and `height` rows: every line is cut (with "…") rather than wrapped.

`watch()` runs them: a background thread collects every `interval` seconds, the main
thread redraws a full-screen `rich.live.Live` and reads keys in cbreak mode.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from rich.console import Console, Group, RenderableType
from rich.text import Text

from . import keys, registry
from .keys import PROGRESS
from .manifest import experiments as list_experiments
from .paths import Layout, read_json
from .status import Status

ETA_WINDOW_SECONDS = 600.0  # the rate of DONE runs is measured over this much of the watch
FILES_REFRESH_SECONDS = 30.0  # experiments known only from their files are re-read this often
MAX_FAILURES = 5
# What the runner adds to a trainer's progress report; the rest is the trainer's own.
_PROGRESS_META = {"name", "experiment", "worker", "gpu", "t"}


# --- the snapshot -----------------------------------------------------------------

@dataclass(frozen=True)
class ExperimentRow:
    name: str
    total: int  # runs of the last submission
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    paused: bool = False
    eta: float | None = None  # seconds left at the observed rate; None: not known yet
    from_files: bool = False  # Redis has no live state of it: counts read from status files
    submitted_at: float = 0.0

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.finished)


@dataclass(frozen=True)
class WorkerRow:
    name: str  # Celery node name
    device: str  # cuda | cpu | control
    gpu: int | None
    state: str  # idle | busy | stopping | stale (late heartbeat) | gone (no record, run leased)
    heartbeat_age: float | None = None  # seconds since its last registry write
    run: str | None = None  # name of the run it trains
    run_started: float | None = None  # unix time the attempt started
    attempt: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # the trainer's latest report
    more_runs: int = 0  # other runs it holds (normally 0)
    memory_used_mb: int | None = None
    memory_total_mb: int | None = None
    utilization: int | None = None


@dataclass(frozen=True)
class FailureRow:
    experiment: str
    name: str  # run name, or its id when the manifest does not list it
    error: str  # the first line of the error
    at: float | None  # unix time


@dataclass(frozen=True)
class Snapshot:
    url: str  # redacted
    results_root: str
    taken_at: float  # unix time
    experiments: list[ExperimentRow] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    failed_total: int = 0  # failed runs over the experiments shown
    focus: str | None = None  # the EXPERIMENT argument
    error: str | None = None  # Redis unreachable: the other fields are the last good read
    error_since: float | None = None


# --- ETA ------------------------------------------------------------------------

class RateWindow:
    """DONE counts per experiment as this watch observed them; the ETA is the remaining
    runs over the rate of DONE within the last `window` seconds of observation."""

    def __init__(self, window: float = ETA_WINDOW_SECONDS):
        self.window = window
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, experiment: str, t: float, done: int) -> None:
        samples = self.samples.setdefault(experiment, deque())
        if samples and done < samples[-1][1]:  # resubmitted or reset: start over
            samples.clear()
        samples.append((t, done))
        while len(samples) > 2 and t - samples[1][0] >= self.window:
            samples.popleft()

    def eta(self, experiment: str, remaining: int) -> float | None:
        if remaining <= 0:
            return 0.0
        samples = self.samples.get(experiment)
        if not samples or len(samples) < 2:
            return None
        (t0, d0), (t1, d1) = samples[0], samples[-1]
        if t1 - t0 <= 0 or d1 <= d0:
            return None
        return remaining / ((d1 - d0) / (t1 - t0))


# --- collecting -----------------------------------------------------------------

@dataclass
class _Manifest:
    stamp: tuple[int, int]
    run_ids: frozenset[str]
    submitted_at: float
    groups: list[dict[str, Any]]
    names: dict[str, str] | None = None  # run_id -> run name, built when first needed

    def name_of(self, run_id: str) -> str:
        if self.names is None:
            from .spec import RunSpec

            names: dict[str, str] = {}
            for g in self.groups:
                for r in g.get("runs", []):
                    with contextlib.suppress(Exception):
                        spec = RunSpec.from_dict(r)
                        names[spec.run_id] = spec.name
            self.names = names
        return self.names.get(run_id, run_id[:12])


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


class Collector:
    """Reads one Snapshot from Redis and the results root; keeps what it needs between
    reads (manifests by modification time, the ETA window, the last good snapshot)."""

    def __init__(self, layout: Layout, client: redis.Redis, url: str, experiment: str | None = None,
                 heartbeat: float | None = None, window: float = ETA_WINDOW_SECONDS):
        self.layout, self.client, self.url, self.focus = layout, client, registry.redact(url), experiment
        self.heartbeat = heartbeat if heartbeat is not None else registry.heartbeat_seconds()
        self.rates = RateWindow(window)
        self._manifests: dict[str, _Manifest] = {}
        self._from_files: dict[str, tuple[float, ExperimentRow, list[FailureRow]]] = {}
        self.last: Snapshot | None = None

    def _manifest(self, name: str) -> _Manifest | None:
        path = self.layout.manifest(name)
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._manifests.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        data = read_json(path)
        if not isinstance(data, dict):
            return cached
        groups = [g for g in data.get("groups", []) if isinstance(g, dict)]
        found = _Manifest(stamp, frozenset(r for g in groups for r in g.get("run_ids", [])),
                          float(data.get("submitted_at") or 0.0), groups)
        self._manifests[name] = found
        return found

    def collect(self) -> Snapshot:
        """A fresh snapshot; when Redis cannot be read, the last good one with `error`."""
        now = time.time()
        try:
            snap = self._collect(now)
        except (redis.RedisError, OSError) as exc:
            base = self.last or Snapshot(self.url, str(self.layout.root), now, focus=self.focus)
            since = base.error_since if base.error else now
            return replace(base, error=f"Redis unreachable at {self.url} ({first_line(str(exc)) or type(exc).__name__}), "
                                       "retrying", error_since=since)
        self.last = snap
        return snap

    def _collect(self, now: float) -> Snapshot:
        names = [self.focus] if self.focus else list_experiments(self.layout)
        manifests = {n: m for n in names if (m := self._manifest(n)) is not None}
        pipe = self.client.pipeline(transaction=False)
        for n in manifests:
            pipe.hgetall(keys.exp_runs(n))
            pipe.hgetall(keys.exp_groups(n))
        pipe.hgetall(keys.ACTIVE)
        pipe.hgetall(PROGRESS)
        replies = pipe.execute()
        records = registry.list_workers(self.client)
        active_raw, progress_raw = replies[-2], replies[-1]

        rows: list[ExperimentRow] = []
        failures: list[FailureRow] = []
        failed_total = 0
        for i, (name, man) in enumerate(manifests.items()):
            runs = _decode_hash(replies[2 * i])
            if not runs and man.run_ids:  # no live state (expired, or a local run): the files
                row, fails = self._from_status_files(name, now)
            else:
                row, fails = self._from_live(name, man, runs, now)
            failed_total += row.failed
            rows.append(row)
            failures += fails
        rows.sort(key=lambda r: (r.remaining == 0, -r.submitted_at, r.name))
        failures.sort(key=lambda f: f.at or 0.0, reverse=True)

        active = {k: v for k, v in _decode_hash(active_raw).items()
                  if isinstance(v, dict) and v.get("token") and isinstance(v.get("worker"), str)}
        progress = _decode_hash(progress_raw)
        return Snapshot(self.url, str(self.layout.root), now, rows,
                        self._workers(records, active, progress, now), failures[:MAX_FAILURES],
                        failed_total, self.focus)

    def _from_live(self, name: str, man: _Manifest, runs: dict[str, Any],
                   now: float) -> tuple[ExperimentRow, list[FailureRow]]:
        counts = {s.value: 0 for s in Status}
        failures = []
        for rid in man.run_ids:
            entry = runs.get(rid)
            state = entry.get("status") if isinstance(entry, dict) else None
            state = state if state in counts else Status.PENDING.value
            counts[state] += 1
            if state == Status.FAILED.value and isinstance(entry, dict):
                failures.append(FailureRow(name, man.name_of(rid), first_line(entry.get("error"))
                                           or "(no error recorded; see orchestrator status)",
                                           entry.get("t")))
        done = counts[Status.DONE.value]
        self.rates.observe(name, time.monotonic(), done)
        row = ExperimentRow(name, len(man.run_ids), done, counts[Status.FAILED.value],
                            counts[Status.CANCELLED.value], counts[Status.IN_PROGRESS.value],
                            paused=self._paused(name), submitted_at=man.submitted_at)
        return replace(row, eta=self.rates.eta(name, row.remaining)), failures

    def _from_status_files(self, name: str, now: float) -> tuple[ExperimentRow, list[FailureRow]]:
        cached = self._from_files.get(name)
        if cached is None or now - cached[0] > FILES_REFRESH_SECONDS:
            from .errors import OrchestratorError
            from .report import experiment_status

            try:
                st = experiment_status(self.layout, name)
            except (OrchestratorError, OSError, ValueError, KeyError, TypeError):
                st = {"runs": {}, "group_details": []}
            counts = st.get("runs", {})
            man = self._manifests.get(name)
            row = ExperimentRow(name, sum(counts.values()), counts.get(Status.DONE.value, 0),
                                counts.get(Status.FAILED.value, 0), counts.get(Status.CANCELLED.value, 0),
                                counts.get(Status.IN_PROGRESS.value, 0), from_files=True,
                                submitted_at=man.submitted_at if man else 0.0)
            fails = [FailureRow(name, f["name"], first_line(f.get("error")) or "(no error recorded)",
                                f.get("finished_at"))
                     for g in st.get("group_details", []) for f in g.get("folds", [])
                     if f.get("state") == Status.FAILED.value]
            cached = (now, row, fails)
            self._from_files[name] = cached
        row = replace(cached[1], paused=self._paused(name))
        return replace(row, eta=0.0 if row.remaining == 0 else None), cached[2]

    def _paused(self, name: str) -> bool:
        return isinstance(read_json(self.layout.paused_marker(name)), dict)

    def _workers(self, records: list[registry.WorkerRecord], active: dict[str, dict[str, Any]],
                 progress: dict[str, Any], now: float) -> list[WorkerRow]:
        by_worker: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for rid, info in sorted(active.items(), key=lambda kv: kv[1].get("started") or 0.0):
            by_worker.setdefault(info["worker"], []).append((rid, info))
        rows = []
        stale_after = 2 * self.heartbeat + 1
        rank = {"cuda": 0, "cpu": 1, "control": 2}
        for rec in sorted(records, key=lambda r: (r.host, rank.get(r.device, 1),
                                                  r.gpu if r.gpu is not None else -1, r.name)):
            age = max(0.0, now - rec.heartbeat)
            state = "stale" if age > stale_after else rec.state
            rows.append(self._worker_row(rec.name, rec.device, rec.gpu, state, age,
                                         by_worker.pop(rec.name, []), progress, rec))
        for worker, held in sorted(by_worker.items()):  # leases of workers with no record
            gpu = next((info.get("gpu") for _, info in held if isinstance(info.get("gpu"), int)), None)
            rows.append(self._worker_row(worker, "?", gpu, "gone", None, held, progress, None))
        return rows

    @staticmethod
    def _worker_row(name: str, device: str, gpu: int | None, state: str, age: float | None,
                    held: list[tuple[str, dict[str, Any]]], progress: dict[str, Any],
                    rec: registry.WorkerRecord | None) -> WorkerRow:
        row = WorkerRow(name, device, gpu, state, age,
                        memory_used_mb=rec.gpu_memory_used_mb if rec else None,
                        memory_total_mb=rec.gpu_memory_total_mb if rec else None,
                        utilization=rec.gpu_utilization if rec else None)
        if not held:
            return row
        rid, info = held[0]
        report = progress.get(rid)
        report = report if isinstance(report, dict) else {}
        started = info.get("started") or info.get("claimed_at")
        return replace(row, run=str(info.get("name") or report.get("name") or rid[:12]),
                       run_started=float(started) if isinstance(started, (int, float)) else None,
                       attempt=info.get("attempt") if isinstance(info.get("attempt"), int) else None,
                       progress=report, more_runs=len(held) - 1)


def _decode_hash(raw: dict[bytes, bytes]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for k, v in raw.items():
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            found[k.decode()] = json.loads(v)
    return found


# --- rendering ------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    """At most 5 characters: 42s, 9m05s, 12m, 3h05m, 99h59m is 5 too, then 4d."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 10 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s < 100 * 3600:
        return f"{s // 3600}h"
    return f"{min(s // 86400, 9999)}d"


def shorten(name: str, width: int) -> str:
    """A run name cut to `width`, keeping its first part (the experiment) and as many of
    its last parts as fit (seed, fold): `iris_sweep/…/seed=0/fold=3`."""
    if len(name) <= width:
        return name
    if width <= 1:
        return "…"[:width]
    parts = name.split("/")
    for k in range(len(parts) - 2, 0, -1):
        candidate = f"{parts[0]}/…/{'/'.join(parts[-k:])}"
        if len(candidate) <= width:
            return candidate
    tail = parts[-1]
    head = width - len(tail) - 2
    if len(parts) == 1 or head < 4:
        return name[:width - 1] + "…"
    return f"{name[:head]}…/{tail}"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def describe_progress(report: dict[str, Any], width: int = 80) -> str:
    """`ep 3 train_loss=0.4312` or `step 41`: epoch or step, then the trainer's first
    metric. Too long for `width`: the metric's name is cut, never its value."""
    parts = []
    if "epoch" in report:
        parts.append(f"ep {_number(report['epoch'])}")
    if "step" in report:
        parts.append(f"step {_number(report['step'])}")
    for key, value in report.items():
        if key in _PROGRESS_META or key in ("epoch", "step"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = _number(value)
            room = width - len(" ".join(parts)) - (1 if parts else 0) - len(number) - 1
            if room >= len(key):
                parts.append(f"{key}={number}")
            elif room >= 2:
                parts.append(f"{key[:room - 1]}…={number}")
            break
    return " ".join(parts)


def gib(mb: int | None) -> str:
    if mb is None:
        return "?"
    value = mb / 1024
    return f"{value:.1f}" if value < 99.95 else f"{value:.0f}"


def _cell(text: str | Text, width: int, right: bool = False) -> Text:
    """`text` in exactly `width` columns: cut with "…" or padded."""
    cell = text.copy() if isinstance(text, Text) else Text(text)
    cell.truncate(width, overflow="ellipsis")
    cell.align("right" if right else "left", width)
    return cell


def _line(*cells: Text) -> Text:
    return Text(" ").join(cells)


def bar(row: ExperimentRow, width: int, ascii_only: bool = False) -> Text:
    """done █ (green), failed or cancelled ▓ (red), running ▒ (yellow), pending ░."""
    chars = "#x>-" if ascii_only else "█▓▒░"
    if width <= 0:
        return Text()
    total = max(row.total, 1)
    cuts = []
    acc = 0
    for count in (row.done, row.failed + row.cancelled, row.running):
        acc += count
        cuts.append(min(width, int(acc * width / total)))
    done_w, failed_w, running_w = cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1]
    if row.running and running_w == 0 and cuts[2] < width:  # running runs always show
        running_w = 1
    rest = max(0, width - done_w - failed_w - running_w)
    return Text.assemble((chars[0] * done_w, "green"), (chars[1] * failed_w, "red"),
                         (chars[2] * running_w, "yellow"), (chars[3] * rest, "bright_black"))


def _experiment_lines(snap: Snapshot, width: int, limit: int | None, ascii_only: bool) -> list[Text]:
    rows = snap.experiments
    if not rows:
        where = f"experiment {snap.focus!r}" if snap.focus else "experiments"
        return [Text(f"no {where} under {snap.results_root} (orchestrator submit CONFIG adds one)",
                     style="yellow")]
    count_w = max(5, *(len(f"{r.done}/{r.total}") for r in rows))
    # Columns after the bar; on a narrow terminal RUNNING, then FAILED, give way (the bar
    # still shows them).
    columns = {"DONE": count_w, "FAILED": 6, "RUNNING": 7, "ETA": 6}
    for optional in ("RUNNING", "FAILED"):
        if width - sum(columns.values()) - len(columns) < 30:
            del columns[optional]
    fixed = sum(columns.values()) + len(columns)  # with the separator before each
    name_w = max(6, min(max(len(r.name) for r in rows), 24, (width - fixed) // 2))
    bar_w = max(0, width - fixed - name_w - 1)
    lines = [_line(_cell("EXPERIMENT", name_w), _cell("PROGRESS", bar_w),
                   *(_cell(title, w, True) for title, w in columns.items()))]
    lines[0].stylize("bold")
    shown = rows if limit is None or len(rows) <= limit else rows[:max(0, limit - 1)]
    for r in shown:
        failed = r.failed + r.cancelled
        if r.paused:
            eta = Text("PAUSED", style="bold yellow")
        elif r.remaining == 0:
            eta = Text("done", style="green")
        else:
            eta = Text(duration(r.eta))
        values = {"DONE": Text(f"{r.done}/{r.total}"),
                  "FAILED": Text(str(failed), style="red" if failed else ""),
                  "RUNNING": Text(str(r.running), style="yellow" if r.running else ""), "ETA": eta}
        lines.append(_line(_cell(Text(r.name, style="bold"), name_w), bar(r, bar_w, ascii_only),
                           *(_cell(values[title], w, True) for title, w in columns.items())))
    if len(shown) < len(rows):
        hidden = rows[len(shown):]
        lines.append(Text(f"… and {len(hidden)} more ({sum(1 for r in hidden if r.remaining == 0)} finished)",
                          style="bright_black"))
    return lines


_STATE_STYLE = {"busy": "green", "idle": "bright_black", "stopping": "yellow", "stale": "bold red",
                "gone": "bold red"}


def _note(r: WorkerRow) -> str:
    """What the PROGRESS column says instead of progress, about a worker in trouble."""
    if r.state == "stale" and r.heartbeat_age is not None:
        return f"no heartbeat {duration(r.heartbeat_age)}"
    if r.state == "gone":
        return "no worker record"
    return ""


def _worker_lines(snap: Snapshot, width: int, limit: int | None) -> list[Text]:
    rows = snap.workers
    if not rows:
        return [Text(f"no live workers registered on {snap.url}", style="yellow")]
    with_gpu = any(r.memory_total_mb is not None for r in rows)
    with_util = with_gpu and width >= 100
    name_w = max(6, min(max(len(r.name) for r in rows), 14))
    fixed = [name_w, 3, 5, 5] + ([9] if with_gpu else []) + ([4] if with_util else [])
    if with_gpu and width - sum(fixed) - (len(fixed) + 1) < 24:  # narrow: memory goes first
        with_gpu, fixed = False, fixed[:4]
    flex = max(16, width - sum(fixed) - (len(fixed) + 1))  # the rest, less the separators
    needed = max((len(_note(r) or describe_progress(r.progress)) for r in rows), default=0)
    prog_w = max(8, min(24, flex // 2, needed))
    run_w = flex - prog_w
    head = [_cell("WORKER", name_w), _cell("GPU", 3), _cell("STATE", 5), _cell("RUN", run_w),
            _cell("PROGRESS", prog_w), _cell("TIME", 5, True)]
    if with_gpu:
        head.append(_cell("MEM GiB", 9, True))
    if with_util:
        head.append(_cell("UTIL", 4, True))
    lines = [_line(*head)]
    lines[0].stylize("bold")
    # One experiment on screen: its name, already above, is left out of the run names.
    prefix = f"{snap.experiments[0].name}/" if len(snap.experiments) == 1 else None
    shown = rows if limit is None or len(rows) <= limit else rows[:max(0, limit - 1)]
    for r in shown:
        gpu = str(r.gpu) if r.gpu is not None else {"control": "ctl", "cpu": "cpu"}.get(r.device, "?")
        state = "stop" if r.state == "stopping" else r.state
        if r.run:
            name = r.run[len(prefix):] if prefix and r.run.startswith(prefix) else r.run
            run = shorten(name, run_w - (3 if r.more_runs else 0)) + (f" +{r.more_runs}" if r.more_runs else "")
            prog = describe_progress(r.progress, prog_w)
            elapsed = duration(snap.taken_at - r.run_started) if r.run_started else "?"
        else:
            run, prog, elapsed = "", "", ""
        prog = _note(r) or prog
        cells = [_cell(r.name, name_w), _cell(gpu, 3), _cell(Text(state, style=_STATE_STYLE.get(r.state, "")), 5),
                 _cell(run, run_w), _cell(prog, prog_w), _cell(elapsed, 5, True)]
        if with_gpu:
            mem = (f"{gib(r.memory_used_mb)}/{gib(r.memory_total_mb)}"
                   if r.memory_total_mb is not None else "")
            cells.append(_cell(mem, 9, True))
        if with_util:
            cells.append(_cell(f"{r.utilization}%" if r.utilization is not None else "", 4, True))
        lines.append(_line(*cells))
    if len(shown) < len(rows):
        lines.append(Text(f"… and {len(rows) - len(shown)} more workers", style="bright_black"))
    return lines


def _failure_lines(snap: Snapshot, width: int, limit: int | None) -> list[Text]:
    if not snap.failures:
        return []
    title = f"RECENT FAILURES ({snap.failed_total} failed run{'s' if snap.failed_total != 1 else ''})"
    lines = [Text(title, style="bold red")]
    shown = snap.failures if limit is None else snap.failures[:max(0, limit)]
    name_w = max(10, min(max(len(f.name) for f in shown) if shown else 10, width // 3))
    for f in shown:
        at = time.strftime("%H:%M:%S", time.localtime(f.at)) if f.at else "--:--:--"
        error_w = max(0, width - 8 - name_w - 2)
        lines.append(_line(_cell(at, 8), _cell(shorten(f.name, name_w), name_w),
                           _cell(Text(f.error, style="red"), error_w)))
    return lines


def _allot(height: int, wanted: list[int], minimum: list[int], order: list[int]) -> list[int]:
    """Rows per section out of `height`: first each its minimum (or what it wants, if
    less) while rows are left, then the rest section by section in `order`."""
    got = [0] * len(wanted)
    left = height
    for i in range(len(wanted)):
        got[i] = min(wanted[i], minimum[i], left)
        left -= got[i]
    for i in order:
        extra = min(wanted[i] - got[i], left)
        got[i] += extra
        left -= extra
    return got


def render(snap: Snapshot, width: int = 80, height: int | None = None, ascii_only: bool = False,
           interval: float | None = None) -> RenderableType:
    """The screen: header, experiments, workers, recent failures, a key hint. Every line
    fits `width` columns; with `height`, sections are cut to fit ("… and N more")."""
    width = max(20, width)
    when = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    title = Text.assemble(("orchestrator watch", "bold"), " ", snap.url)
    title.truncate(max(1, width - len(when) - 1), overflow="ellipsis")
    header = [Text.assemble(title, " " * max(1, width - title.cell_len - len(when)), when)]
    busy = sum(1 for w in snap.workers if w.run)
    unfinished = sum(1 for e in snap.experiments if e.remaining)
    header.append(Text(
        f"{len(snap.workers)} worker{'s' if len(snap.workers) != 1 else ''} ({busy} training) · "
        f"{unfinished}/{len(snap.experiments)} experiments unfinished · "
        f"{sum(e.running for e in snap.experiments)} running · {snap.failed_total} failed",
        style="bright_black"))
    if snap.error:
        since = f" (since {time.strftime('%H:%M:%S', time.localtime(snap.error_since))})" if snap.error_since else ""
        header.append(Text(snap.error + since, style="bold red"))
    footer = Text("q quit" + (f" · refresh every {interval:g}s" if interval else "")
                  + f" · results {snap.results_root}", style="bright_black")

    n_fail = len(snap.failures) + 1 if snap.failures else 0
    wanted = [len(snap.experiments) + 1, len(snap.workers) + 1, n_fail]
    if height is None:
        limits: list[int | None] = [None, None, None]
    else:
        fixed = len(header) + 1 + 3  # header, footer, a blank line before each section
        got = _allot(max(0, height - fixed), [max(2, wanted[0]), max(2, wanted[1]), wanted[2]],
                     [3, 3, 2], order=[1, 0, 2])
        limits = [max(1, got[0] - 1), max(1, got[1] - 1), max(0, got[2] - 1)]
    parts: list[Text] = [*header, Text()]
    parts += _experiment_lines(snap, width, limits[0], ascii_only)
    parts.append(Text())
    parts += _worker_lines(snap, width, limits[1])
    failures = _failure_lines(snap, width, limits[2])
    if failures and (limits[2] is None or limits[2] > 0):
        parts += [Text(), *failures]
    parts.append(footer)
    for p in parts:
        p.no_wrap = True
        p.overflow = "ellipsis"
        p.truncate(width, overflow="ellipsis")
    return Group(*parts)


def frame_text(snap: Snapshot, width: int = 80, height: int | None = None, ascii_only: bool = False) -> str:
    """The screen as plain text (tests, docs/watching.md, `--once` into a pipe)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render(snap, width, height, ascii_only))
    return console.export_text()


# --- the live screen ------------------------------------------------------------

class _Keys:
    """Keys from a terminal in cbreak mode (no echo, no line buffering; Ctrl-C still
    sends SIGINT); the terminal's settings come back on exit, whatever happened."""

    def __init__(self, stream: Any):
        self.fd = stream.fileno()
        self.saved: Any = None

    def __enter__(self) -> _Keys:
        import termios
        import tty

        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        if self.saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        try:
            data = os.read(self.fd, 64)
        except OSError:
            return ""
        if not data:  # the terminal went away
            raise EOFError
        return data.decode(errors="replace")


class _Quit(Exception):
    """SIGTERM or SIGHUP: leave the screen as Ctrl-C does."""


_hung_up = threading.Event()  # after SIGHUP the terminal may be gone: writes to it fail


@contextlib.contextmanager
def _quit_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        _hung_up.set()
        raise _Quit(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def watch(collector: Collector, console: Console, interval: float = 1.0) -> None:
    """The full-screen view until `q`, Ctrl-C, SIGTERM or SIGHUP. Collecting runs in a
    background thread, so keys are answered at once even while Redis is slow."""
    from rich.live import Live

    latest = [collector.collect()]
    fresh = threading.Event()
    stop = threading.Event()

    def collect_loop() -> None:
        while not stop.wait(interval):
            latest[0] = collector.collect()
            fresh.set()

    thread = threading.Thread(target=collect_loop, name="watch-collect", daemon=True)
    ascii_only = not (console.encoding or "").lower().startswith("utf")

    def frame() -> RenderableType:
        return render(latest[0], console.width, console.height, ascii_only, interval)

    try:
        with _quit_on_signals(), _Keys(sys.stdin) as keys, \
                Live(frame(), console=console, screen=True, auto_refresh=False,
                     redirect_stdout=False, redirect_stderr=False) as live:
            thread.start()
            size = console.size
            while True:
                pressed = keys.read(0.1)
                if "q" in pressed.lower():
                    return
                if fresh.is_set() or console.size != size or "r" in pressed.lower():
                    fresh.clear()
                    size = console.size
                    live.update(frame(), refresh=True)
    except (KeyboardInterrupt, _Quit, EOFError):
        return
    except OSError:
        if not _hung_up.is_set():
            raise
    finally:
        stop.set()


def once(collector: Collector, console: Console) -> Snapshot:
    snap = collector.collect()
    ascii_only = not (console.encoding or "").lower().startswith("utf")
    console.print(render(snap, console.width, None, ascii_only))
    return snap


def redis_client(url: str) -> redis.Redis:
    """Short timeouts: a watch that cannot reach Redis says so within seconds."""
    return keys.client(url, "command")
