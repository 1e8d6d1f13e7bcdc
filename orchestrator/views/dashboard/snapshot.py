"""The dashboard's snapshot: plain dataclasses, the ETA's rate window, and the Collector that fills them from Redis and the results root."""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from ... import keys
from ...cluster import registry
from ...collect.status import Status
from ...dispatch.manifest import experiments as list_experiments
from ...keys import PROGRESS
from ...livestate import status_of
from ...paths import Layout, read_json

ETA_WINDOW_SECONDS = 600.0  # the rate of DONE runs is measured over this much of the watch
FILES_REFRESH_SECONDS = 30.0  # experiments known only from their files are re-read this often
MAX_FAILURES = 5
# What the runner adds to a trainer's progress report; the rest is the trainer's own.
PROGRESS_META = {"name", "experiment", "worker", "gpu", "t"}


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
    search: str | None = None  # a search: its trials, generation and best so far, in a line

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
class RankRow:
    """One rank of a data-parallel run, as its lease says (orch:rank:...)."""

    rank: int
    worker: str
    host: str | None = None
    gpu: str | None = None
    step: Any = None  # its trainer's last reported epoch
    beat_age: float | None = None  # seconds since its last heartbeat
    attempt: int | None = None
    late: bool = False  # its last beat is older than a rank lease (ORCH_GANG_LEASE_SECONDS)


@dataclass(frozen=True)
class GangRow:
    """A data-parallel run now held by an attempt, and the ranks of its gang."""

    run: str  # run name
    state: str | None  # joining | training | done | waiting
    attempt: int | None
    world: int | None
    why: str | None = None  # why it waits, or why its attempt was aborted
    ranks: list[RankRow] = field(default_factory=list)


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
    gangs: list[GangRow] = field(default_factory=list)  # data-parallel runs held now, their ranks


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
            from ...experiment.spec import RunSpec

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
            raw = replies[2 * i]
            states = _run_states(raw)
            if not states and man.run_ids:  # no live state (expired, or a local run): the files
                row, fails = self._from_status_files(name, now)
            else:
                row, fails = self._from_live(name, man, states, raw, now)
            failed_total += row.failed
            if self.layout.search_config(name).exists():
                row = replace(row, search=_search_line(self.layout, name))
            rows.append(row)
            failures += fails
        rows.sort(key=lambda r: (r.remaining == 0, -r.submitted_at, r.name))
        failures.sort(key=lambda f: f.at or 0.0, reverse=True)

        active = {k: v for k, v in _decode_hash(active_raw).items()
                  if isinstance(v, dict) and v.get("token") and isinstance(v.get("worker"), str)}
        progress = _decode_hash(progress_raw)
        gangs, by_worker = self._gangs(active, now)
        workers = _with_ranks(self._workers(records, active, progress, now), by_worker)
        return Snapshot(self.url, str(self.layout.root), now, rows, workers, failures[:MAX_FAILURES],
                        failed_total, self.focus, gangs=gangs)

    def _gangs(self, active: dict[str, dict[str, Any]],
               now: float) -> tuple[list[GangRow], dict[str, dict[str, Any]]]:
        """The gangs of the runs held now (`status` reads them the same way:
        execution.gang.gang_views, two round trips), and their rank records by worker."""
        from ...execution.gang import gang_views, lease_ms

        held = {k: v for k, v in active.items() if not self.focus or v.get("experiment") == self.focus}
        gangs: list[GangRow] = []
        by_worker: dict[str, dict[str, Any]] = {}
        views = gang_views(self.client, sorted(held)) if held else {}
        lease = lease_ms() / 1000
        for key, view in sorted(views.items(), key=lambda kv: str(held[kv[0]].get("name"))):
            ranks = []
            for rec in view["ranks"]:
                if not isinstance(rec.get("worker"), str) or not isinstance(rec.get("rank"), int):
                    continue
                by_worker[rec["worker"]] = rec
                beat, gpu = rec.get("beat"), rec.get("gpu")
                age = max(0.0, now - beat) if isinstance(beat, (int, float)) else None
                ranks.append(RankRow(rec["rank"], rec["worker"], str(rec.get("host") or "") or None,
                                     None if gpu is None else str(gpu), rec.get("step"), age,
                                     rec.get("attempt") if isinstance(rec.get("attempt"), int) else None,
                                     late=age is not None and age > lease))
            why = view.get("why") if view.get("state") == "waiting" else view.get("abort")
            gangs.append(GangRow(str(held[key].get("name") or key[:12]), view.get("state"), view.get("attempt"),
                                 view.get("world"), why, sorted(ranks, key=lambda r: r.rank)))
        return gangs, by_worker

    def _from_live(self, name: str, man: _Manifest, states: dict[str, str | None],
                   raw: dict[bytes, bytes], now: float) -> tuple[ExperimentRow, list[FailureRow]]:
        """`states`: _run_states(raw), raw: the experiment's runs hash as Redis sent it
        (only a FAILED run's value is decoded in full, for its error)."""
        counts = {s.value: 0 for s in Status}
        failures = []
        for rid in man.run_ids:
            state = states.get(rid)
            state = state if state in counts else Status.PENDING.value
            counts[state] += 1
            if state == Status.FAILED.value and isinstance(entry := _json(raw.get(rid.encode())), dict):
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
            from ...errors import OrchestratorError
            from ..overview import experiment_status

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


def _with_ranks(rows: list[WorkerRow], ranks: dict[str, dict[str, Any]]) -> list[WorkerRow]:
    """A worker training a rank of a data-parallel run says so: rank 0 holds the run (its
    row names it already), ranks 1..N-1 hold no run lease, so their row gets the run here."""
    out = []
    for row in rows:
        rec = ranks.get(row.name)
        if rec is None:
            out.append(row)
            continue
        tag = f"[rank {rec.get('rank')}/{rec.get('world') or '?'}] "  # first: names get shortened
        if row.run is not None:
            out.append(replace(row, run=tag + row.run))
        else:
            step = rec.get("step")
            out.append(replace(row, run=tag + str(rec.get("name") or "?"),
                               run_started=rec.get("started") if isinstance(rec.get("started"), float) else None,
                               attempt=rec.get("attempt") if isinstance(rec.get("attempt"), int) else None,
                               progress={"epoch": step} if step is not None else {}))
    return out


def _json(value: bytes | None) -> Any:
    """The JSON `value` decoded; None if it is missing or not JSON."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None


def _run_states(raw: dict[bytes, bytes]) -> dict[str, str | None]:
    """run_id -> status of an experiment's runs hash, as _decode_hash would give each
    entry's "status" (None: a JSON value without one; a value that is not JSON is left
    out). Read from the start of each value (livestate.status_of), not by decoding it:
    every frame reads the whole hash, and 100,000 json.loads cost ~0.4 s of CPU."""
    found: dict[str, str | None] = {}
    for k, v in raw.items():
        try:
            rid = k.decode()
        except UnicodeDecodeError:
            continue
        status = status_of(v)  # None: no quick answer (or none at all); decode it
        if status is None:
            data = _json(v)
            if data is None:
                continue
            status = data.get("status") if isinstance(data, dict) else None
        found[rid] = status
    return found


def _decode_hash(raw: dict[bytes, bytes]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for k, v in raw.items():
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            found[k.decode()] = json.loads(v)
    return found


def _search_line(layout: Layout, name: str) -> str | None:
    """The search's trials, generation and best so far (its journal is read
    incrementally: a watch frame costs a stat when nothing changed)."""
    from ..search import search_status, status_line

    try:
        st = search_status(layout, name)
    except (OSError, ValueError, KeyError):
        return None
    return None if st is None else status_line(name, {**st, "trial_details": None})
