#!/usr/bin/env python
"""Chaos soak: hundreds of short runs while training workers die like lost hosts.

    python benchmarks/chaos.py [--runs 500] [--workers 3] [--seed 1] [--kill-min 4]
                               [--kill-max 8] [--min-alive 1] [--tmp-dir DIR] [--ref REF]
                               [--timeout 900] [--keep]

A private redis-server, `--workers` CPU training workers and one control worker (the
watchdog), all `python -m orchestrator worker` in their own process groups, with the
default lease (10 s) and watchdog interval (2 s): every ORCH_* variable of the caller is
dropped, since the promise under test is about the defaults. `--runs` runs of the test
trainer `slow` (tests/plugins.py; 0.5-1.5 s each, groups of 5 folds) are submitted at
once, so there is a backlog. Every `--kill-min`..`--kill-max` seconds (uniform, seeded)
one training worker that is up (its log says "ready."), chosen at random, is SIGKILLed
with its whole process group (a host that dies: no goodbye, no hand-back) and started
again at once, until every group is final (DONE or FAILED). A kill that would leave
fewer than `--min-alive` training workers up waits until a restarted one is ready (on
a loaded machine a worker can take longer to start than the time between kills, and
with no worker up nothing can be handed on), and its time is then drawn again (killed
at once, a worker that just said "ready." would nearly always die between taking its
first message and claiming it); how often and how long is printed.

Then the disk is checked on its own, not through the project's counters:
- commits seen: a watcher thread (inotify through the `inotify_simple` package if it is
  installed, else an os.scandir poll every 0.2 s) records every appearance of each
  `fold_<i>/` folder (with its inode) and every removal; more than one appearance, or any
  removal, is a duplicate commit;
- every run: its status file DONE (or FAILED with a reason), one DONE entry in its
  history, attempt numbers that only grow, its fold folder with the four files, whose
  metadata.json names the run and the same attempt as the status file, the history's DONE
  entry and the final_results.csv row;
- final_results.csv: one row per DONE run, no run twice, no unknown run;
- leftovers: no `.staging` folder and no `*.tmp` file anywhere under the results root.
Lost = runs that never became final, or DONE without their files.

Kill to restart: just before each kill, and again right after it, the script reads Redis
`orch:active` (the attempts the victim holds: worker, name, token) and kombu's `unacked`
hash (messages delivered but claimed by no attempt). After the soak, each run the victim
was training gets its time from the kill to the start of its next attempt (its status
file's history); the goal is worst < 30 s. A message the victim had taken (its log says
"received") but not yet claimed is timed the same way, apart: no lease covers it. The
kills, with what each found, are written to kills.json in the temporary folder.

The load average is printed at the start and the end: the machine is shared. Exit
status 0 when every invariant holds and the worst kill-to-restart is under 30 s; 1
otherwise (the temporary folder, with every worker's log, is then kept); 2 for bad
options. --ref REF runs every process from `git archive REF` instead of the working tree.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESTART_GOAL = 30.0  # seconds from a kill to the restart of the victim's runs
FOLDS = 5
EXPERIMENT = "chaos"
FOLD_DIR = re.compile(r"fold_\d+")
# Folders of a group the watcher need not enter (fold_<i> is what it looks for).
NOT_ENTERED = {".staging", "status", "logs", "ensemble"}
FINAL = ("DONE", "FAILED", "CANCELLED")
# Celery's own INFO lines in a worker's log: a message taken from the queue, a task ended.
RECEIVED = re.compile(r"^\[([0-9-]+ [0-9:,]+): INFO/MainProcess\] Task tasks\.train_run\[([0-9a-f-]+)\] received", re.M)
READY = re.compile(r"^\[([0-9-]+ [0-9:,]+): INFO/MainProcess\] \S+ ready\.", re.M)
FINISHED = re.compile(r"Task tasks\.train_run\[([0-9a-f-]+)\] (?:succeeded|failed|retry)")


def project(module: str, before: str) -> Any:
    """orchestrator.<module>, or orchestrator.<before> in a tree (--ref) from before the
    modules were grouped by stage."""
    import importlib

    try:
        return importlib.import_module(f"orchestrator.{module}")
    except ModuleNotFoundError:
        return importlib.import_module(f"orchestrator.{before}")


# --- the watcher of commits --------------------------------------------------------------

@dataclass
class Appearances:
    """What happened to one `fold_<i>/` path: every distinct appearance (inode) and removal."""

    inodes: list[int | None] = field(default_factory=list)
    removals: int = 0
    current: int | None = None
    first_seen: float = 0.0

    def appeared(self, inode: int | None) -> None:
        # The same folder may be reported twice (a scan after a watch was added, then
        # the event queued meanwhile): one appearance as long as nothing removed it.
        if self.inodes and self.current is not None and inode == self.current:
            return
        if not self.inodes:
            self.first_seen = time.time()
        self.inodes.append(inode)
        self.current = inode

    def removed(self) -> None:
        self.removals += 1
        self.current = None


class CommitWatcher(threading.Thread):
    """Records every appearance of a `fold_<i>` folder under `root` (inotify when the
    `inotify_simple` package is there: every rename is seen, also one replaced within a
    polling interval; else os.scandir polling)."""

    def __init__(self, root: Path):
        super().__init__(name="commit-watcher", daemon=True)
        self.root = root
        self.folds: dict[str, Appearances] = {}
        self.problem: str | None = None  # the watcher could not see everything
        self._halt = threading.Event()
        self._lock = threading.Lock()
        try:
            import inotify_simple
        except ImportError:
            self.how = "os.scandir polling every 0.2 s (pip install inotify_simple for inotify)"
            self._inotify = None
        else:
            self.how = "inotify (inotify_simple)"
            self._flags = inotify_simple.flags
            self._inotify = inotify_simple.INotify()
            self._watched: dict[int, Path] = {}
            root.mkdir(parents=True, exist_ok=True)
            self._watch(root)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _fold(self, path: Path) -> Appearances:
        with self._lock:
            return self.folds.setdefault(str(path), Appearances())

    def _inode(self, path: Path) -> int | None:
        try:
            return os.stat(path).st_ino
        except FileNotFoundError:
            return None  # gone again already: still an appearance

    # inotify ---------------------------------------------------------------------
    def _watch(self, folder: Path) -> None:
        f = self._flags
        mask = f.CREATE | f.MOVED_TO | f.MOVED_FROM | f.DELETE | f.ONLYDIR | f.DONT_FOLLOW
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(folder, mask)
        except OSError as exc:
            if not folder.exists():
                return
            self.problem = f"cannot watch {folder}: {exc}"
            return
        self._watched[wd] = folder
        # What was created before the watch existed.
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                if entry.is_dir(follow_symlinks=False):
                    self._entered(folder / entry.name, entry.inode())

    def _entered(self, path: Path, inode: int | None) -> None:
        if FOLD_DIR.fullmatch(path.name):
            self._fold(path).appeared(inode)
        elif path.name not in NOT_ENTERED:
            self._watch(path)

    def _run_inotify(self) -> None:
        f = self._flags
        assert self._inotify is not None
        while not self._halt.is_set():
            for event in self._inotify.read(timeout=200):
                if event.mask & f.Q_OVERFLOW:
                    self.problem = "the inotify queue overflowed: some events were not seen"
                    continue
                folder = self._watched.get(event.wd)
                if folder is None or not event.mask & f.ISDIR:
                    continue
                path = folder / event.name
                if event.mask & (f.CREATE | f.MOVED_TO):
                    self._entered(path, self._inode(path))
                elif event.mask & (f.DELETE | f.MOVED_FROM) and FOLD_DIR.fullmatch(event.name):
                    self._fold(path).removed()
        self._inotify.close()

    # polling ---------------------------------------------------------------------
    def _scan(self, folder: Path, seen: dict[str, int | None]) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(folder):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if FOLD_DIR.fullmatch(entry.name):
                    seen[entry.path] = entry.inode()
                elif entry.name not in NOT_ENTERED:
                    self._scan(Path(entry.path), seen)

    def _run_polling(self) -> None:
        last: dict[str, int | None] = {}
        while True:
            seen: dict[str, int | None] = {}
            self._scan(self.root, seen)
            for path, inode in seen.items():
                if last.get(path, -1) != inode:
                    if path in last:
                        self._fold(Path(path)).removed()  # replaced between two scans
                    self._fold(Path(path)).appeared(inode)
            for path in last.keys() - seen.keys():
                self._fold(Path(path)).removed()
            last = seen
            if self._halt.wait(0.2):
                return

    def run(self) -> None:
        if self._inotify is not None:
            self._run_inotify()
        else:
            self._run_polling()


# --- the cluster -------------------------------------------------------------------------

class Soak:
    """A private Redis, training workers cpu1..cpuN and a control worker."""

    def __init__(self, base: Path, tree: Path, workers: int):
        start_redis = project("cluster.local", "local").start_redis

        self.base, self.tree = base, tree
        self.root = base / "results"
        self.logs = base / "logs"
        self.logs.mkdir(parents=True)
        self.redis_proc, self.url = start_redis(base / "redis")
        import redis

        self.client = redis.Redis.from_url(self.url, socket_timeout=10)
        self.training = [f"cpu{i}" for i in range(1, workers + 1)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        self.ready_at: dict[str, float | None] = {}  # the current incarnation's "ready." time
        self.killed_at: dict[str, float | None] = {}  # the kill that the current incarnation follows
        self.restarts: list[float] = []  # seconds from each kill to the victim's "ready." again

    def env(self) -> dict[str, str]:
        # Defaults for every ORCH_* setting (lease 10 s, watchdog 2 s), except the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env.update(PYTHONPATH=str(self.tree), PYTHONUNBUFFERED="1", ORCH_TRAINER_MODULES="tests.plugins",
                   ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root))
        return env

    def start_worker(self, name: str, after_kill: float | None = None) -> None:
        spawn = project("cluster.local", "local").spawn

        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
        argv = [*base, "--control"] if name == "control" else \
            [*base, "--cpu", "--accept-gpu-runs", "--name", f"{name}@%h"]
        log = self.logs / f"{name}.log"
        # Where this incarnation's lines begin in the log (restarts append to it).
        self.offsets[name] = log.stat().st_size if log.exists() else 0
        self.ready_at[name] = None
        self.killed_at[name] = after_kill
        self.procs[name] = spawn(argv, self.env(), log)
        self.starts[name] = self.starts.get(name, 0) + 1

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ready(self, name: str) -> bool:
        """Whether the worker's current incarnation has said "ready." (its log)."""
        if self.ready_at[name] is None:
            with open(self.logs / f"{name}.log", "rb") as fh:
                fh.seek(self.offsets[name])
                found = READY.search(fh.read().decode(errors="replace"))
            if found:
                at = self.ready_at[name] = log_time(found.group(1))
                if (killed := self.killed_at[name]) is not None:
                    self.restarts.append(at - killed)
        return self.ready_at[name] is not None

    def wait_ready(self, timeout: float = 180) -> None:
        names = [*self.training, "control"]
        deadline = time.monotonic() + timeout
        while not all(self.log(n).count("ready.") >= self.starts[n] for n in names):
            dead = [n for n in names if self.procs[n].poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SoakError(f"workers not ready ({', '.join(dead) or 'timeout'}); logs in {self.logs}")
            time.sleep(0.2)

    def kill(self, name: str) -> tuple[float, dict[str, float]]:
        """SIGKILL the worker's whole process group. Returns when it was sent, and the
        training messages this incarnation had received (its log) and not finished, with
        when it received them."""
        proc = self.procs[name]
        at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        with open(self.logs / f"{name}.log", "rb") as fh:
            fh.seek(self.offsets[name])
            text = fh.read().decode(errors="replace")
        finished = set(FINISHED.findall(text))
        received = {task: log_time(stamp) for stamp, task in RECEIVED.findall(text) if task not in finished}
        return at, received

    def stop(self) -> None:
        stop_process = project("cluster.local", "local").stop_process

        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            stop_process(proc, grace=15)
        stop_process(self.redis_proc, grace=5)


def log_time(stamp: str) -> float:
    """Unix time of a Celery log stamp (local time, milliseconds after the comma)."""
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000


class SoakError(RuntimeError):
    """The soak could not be carried out (not an invariant: the set-up broke)."""


# --- the experiment ----------------------------------------------------------------------

def write_config(path: Path, runs: int, rng: random.Random) -> int:
    """`runs` rounded up to whole groups of FOLDS folds; each group its own point (a
    distinct `smoothing`) and its own training time. Returns the number of groups."""
    import yaml

    groups = -(-runs // FOLDS)
    seconds = [round(rng.uniform(0.5, 1.5), 2) for _ in range(groups)]
    doc = {"experiment": EXPERIMENT, "trainer": "slow", "datasets": ["iris"], "folds": FOLDS,
           "resources": {"gpus": 0},
           "sweep": {"zip": {"seconds": seconds, "smoothing": [float(i + 1) for i in range(groups)]}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return groups


@dataclass
class Kill:
    at: float
    victim: str
    active: list[dict[str, Any]]  # orch:active entries the victim held, with run_id
    unclaimed: list[tuple[str, str]]  # (task id, run_id): delivered, claimed by no one
    received: dict[str, float] = field(default_factory=dict)  # the victim's, not finished


def look(soak: Soak, victim: str, by_key: dict[str, str], by_point_fold: dict[tuple[str, int], str],
         counted: set[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The victim's attempts in `orch:active` (keyed by run_key), and the unacknowledged
    training messages that no attempt holds: (task id, run_id). Called just before the
    kill and again right after it (what the victim claimed or took in between; its
    entries stay until the watchdog revokes them). Each attempt (token) and delivery is
    counted once, at its first kill: an attempt of an earlier incarnation of the same
    worker stays in `orch:active` until its lease lapses."""
    active = []
    held_tasks = set()
    for key, raw in cast(dict[bytes, bytes], soak.client.hgetall("orch:active")).items():
        entry = json.loads(raw)
        if not entry.get("token"):
            continue
        held_tasks.add(entry.get("task_id"))
        if str(entry.get("worker", "")).startswith(victim + "@") and entry["token"] not in counted:
            counted.add(entry["token"])
            active.append({**entry, "run_id": by_key.get(key.decode(), key.decode())})
    unclaimed = []
    delivered = dict(cast(list[tuple[bytes, float]], soak.client.zrange("unacked_index", 0, -1, withscores=True)))
    for tag, raw in cast(dict[bytes, bytes], soak.client.hgetall("unacked")).items():
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            payload = json.loads(raw)[0]
            headers = payload["headers"]
            delivery = f"{headers['id']}@{delivered.get(tag)}"
            if headers["task"] != "tasks.train_run" or headers["id"] in held_tasks or delivery in counted:
                continue
            counted.add(delivery)
            spec = json.loads(base64.b64decode(payload["body"]))[0][0]
            run_id = by_point_fold.get((spec["point"], int(spec["fold"])))
            if run_id:
                unclaimed.append((headers["id"], run_id))
    return active, unclaimed


# --- the audit ---------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def groups_final(layout: Any, firsts: list[Any]) -> int:
    done = 0
    for spec in firsts:
        record = read_json(layout.group_status(spec))
        if isinstance(record, dict) and record.get("train_status") in FINAL:
            done += 1
    return done


@dataclass
class Audit:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed, not failures

    def fail(self, what: str) -> None:
        self.problems.append(what)


def audit_disk(layout: Any, specs: list[Any], watcher: CommitWatcher, root: Path) -> tuple[Audit, dict[str, Any]]:
    """Every invariant, from the files alone. Returns the audit and each run's status record."""
    from orchestrator.paths import FOLD_FILES

    a = Audit()
    records: dict[str, Any] = {}
    groups: dict[str, str | None] = {}  # group_id -> its status.json train_status
    logs_of: dict[str, list[str]] = {}
    unrecorded = adopted = 0  # attempt logs with no history entry; runs DONE by adoption
    folds_of: dict[str, list[str | None]] = {}
    for spec in specs:
        if spec.group_id not in groups:
            record = read_json(layout.group_status(spec))
            groups[spec.group_id] = record.get("train_status") if isinstance(record, dict) else None
        folds_of.setdefault(spec.group_id, []).append(
            (read_json(layout.fold_status(spec)) or {}).get("status"))
    for group_id, state in groups.items():
        states = folds_of[group_id]
        if (state == "DONE") != all(f == "DONE" for f in states) or state not in ("DONE", "FAILED"):
            a.fail(f"group {group_id}: status.json says {state}, its folds {states}")
    done = failed = lost = duplicates = 0
    expected_folds = set()
    rows_by_run: dict[str, list[dict[str, str]]] = {}
    results = layout.final_results(EXPERIMENT)
    if results.exists():
        with open(results, newline="") as fh:
            for row in csv.DictReader(fh):
                rows_by_run.setdefault(row.get("run_id", ""), []).append(row)
    else:
        a.fail(f"{results} is missing")
    for spec in specs:
        fold_dir = layout.fold_dir(spec)
        expected_folds.add(str(fold_dir))
        record = read_json(layout.fold_status(spec))
        records[spec.run_id] = record
        state = record.get("status") if isinstance(record, dict) else None
        seen = watcher.folds.get(str(fold_dir), Appearances())
        commits = len(seen.inodes)
        if commits > 1 or seen.removals:
            duplicates += 1
            a.fail(f"{spec.name}: fold folder appeared {commits} times (inodes {seen.inodes}), "
                   f"removed {seen.removals} times")
        history = record.get("history", []) if isinstance(record, dict) else []
        attempts = [h.get("attempt") for h in history]
        if attempts != sorted(set(attempts)):
            a.fail(f"{spec.name}: history attempts {attempts} repeat or go back")
        logs = logs_of.get(spec.group_id)
        if logs is None:
            with contextlib.suppress(FileNotFoundError):
                logs = logs_of[spec.group_id] = os.listdir(layout.logs_dir(spec))
        logged = {int(m.group(1)) for n in logs or [] if (m := re.fullmatch(rf"fold_{spec.fold}\.attempt_(\d+)\.log", n))}
        unrecorded += len(logged - set(attempts))
        adopted += any(h.get("adopted") for h in history)
        if state == "FAILED":
            failed += 1
            outcomes = ", ".join(f"{h.get('outcome')} on {h.get('worker')}" for h in history)
            a.notes.append(f"FAILED {spec.name}: {record.get('error')} (history: {outcomes})")
            if not record.get("error"):
                a.fail(f"{spec.name}: FAILED without a reason")
            if commits:
                a.fail(f"{spec.name}: FAILED but its fold folder was committed")
            continue
        if state != "DONE":
            lost += 1
            a.fail(f"{spec.name}: {state or 'no status file'} at the end")
            continue
        done += 1
        files = layout.fold_files(spec)
        missing = [n for n in FOLD_FILES if not files[n].is_file() or files[n].stat().st_size == 0]
        meta = read_json(files["metadata.json"])
        if missing or not isinstance(meta, dict):
            lost += 1
            a.fail(f"{spec.name}: DONE but {missing or 'metadata.json unreadable'}")
            continue
        if commits != 1:
            a.fail(f"{spec.name}: DONE, its fold folder seen committed {commits} times")
        elif seen.current is not None and os.stat(fold_dir).st_ino != seen.current:
            a.fail(f"{spec.name}: fold folder's inode changed after its commit was seen")
        dones = [h for h in history if h.get("outcome") == "DONE"]
        if meta.get("run_id") != spec.run_id:
            a.fail(f"{spec.name}: metadata.json names run {meta.get('run_id')}")
        if len(dones) != 1:
            a.fail(f"{spec.name}: {len(dones)} DONE entries in its history")
        elif not meta.get("attempt") == record.get("attempt") == dones[0].get("attempt"):
            a.fail(f"{spec.name}: attempt {meta.get('attempt')} in metadata.json, {record.get('attempt')} "
                   f"in the status file, {dones[0].get('attempt')} in its history's DONE entry")
        rows = rows_by_run.get(spec.run_id, [])
        if groups[spec.group_id] != "DONE":
            if len(rows) > 1:  # a FAILED group's finished runs need no row, never two
                a.fail(f"{spec.name}: {len(rows)} rows in final_results.csv")
        elif len(rows) != 1:
            a.fail(f"{spec.name}: {len(rows)} rows in final_results.csv")
        elif rows[0].get("attempt") != str(meta.get("attempt")):
            a.fail(f"{spec.name}: final_results.csv says attempt {rows[0].get('attempt')}, "
                   f"metadata.json {meta.get('attempt')}")
    known = {s.run_id for s in specs}
    unknown = sorted(set(rows_by_run) - known)
    if unknown:
        a.fail(f"final_results.csv: rows of unknown runs {unknown[:5]}")
    csv_rows = sum(len(r) for r in rows_by_run.values())
    stray = sorted(set(watcher.folds) - expected_folds)
    if stray:
        a.fail(f"fold folders that belong to no run: {stray[:5]}")
    leftovers = [p for p in root.rglob("*") if p.name == ".staging" or p.name.endswith(".tmp")]
    for p in leftovers[:10]:
        a.fail(f"leftover: {p}")
    if watcher.problem:
        a.fail(f"commit watcher: {watcher.problem}")
    a.figures.update(unrecorded=unrecorded, adopted=adopted)
    a.figures.update(groups_done=sum(g == "DONE" for g in groups.values()),
                     groups_failed=sum(g == "FAILED" for g in groups.values()))
    a.figures.update(runs=len(specs), DONE=done, FAILED=failed, duplicates=duplicates, lost=lost,
                     leftovers=len(leftovers), csv_rows=csv_rows)
    return a, records


@dataclass
class Restarts:
    """Seconds from a kill to the next start, with the run's name and the victim."""

    training: list[tuple[float, str, str]] = field(default_factory=list)  # in orch:active
    finished_first: list[str] = field(default_factory=list)  # ended between snapshot and kill
    taken: list[tuple[float, str, str]] = field(default_factory=list)  # received, not claimed
    others: list[tuple[float, str, str]] = field(default_factory=list)  # unclaimed, not the victim's
    held: list[float] = field(default_factory=list)  # seconds the victim held each `taken` unstarted


def next_start(history: list[dict[str, Any]], node: str, kill: Kill, since: float) -> float | None:
    """Seconds from the kill to the start of the run's first attempt after the victim's
    (the victim's: its last one started between `since` and the kill); with no attempt
    of the victim, to the first start after `since`. None if the
    victim's attempt had ended DONE by the kill; inf if nothing started again."""
    mine = [i for i, h in enumerate(history) if str(h.get("worker", "")).startswith(node)
            and since <= h.get("started_at", 0) <= kill.at + 0.5]
    if mine:
        killed = history[mine[-1]]
        if killed.get("adopted"):
            # Its outputs were committed before the kill, its DONE mark not: the next
            # attempt adopted them (runner.adopt) instead of training; that is its restart.
            return float(killed.get("finished_at", float("inf"))) - kill.at
        if killed.get("outcome") == "DONE" and killed.get("finished_at", kill.at) <= kill.at + 0.5:
            return None  # it ended between the look and the kill
        later = [h["started_at"] for h in history[mine[-1] + 1:] if "started_at" in h]
    else:
        if any(h.get("outcome") == "DONE" and since <= h.get("finished_at", 0) <= kill.at + 0.5 for h in history):
            return None  # its attempt had just ended (released, its message not yet acknowledged)
        later = [h["started_at"] for h in history if h.get("started_at", 0) >= since]
    return (min(later) - kill.at) if later else float("inf")


def restart_times(kills: list[Kill], specs_by_id: dict[str, Any], records: dict[str, Any]) -> Restarts:
    """For each run the victim was training, the seconds from the kill to its next
    attempt's start (the status file's history); the same for messages the victim had
    taken (its log says received) but not claimed at the look, which no lease covers."""
    r = Restarts()
    for kill in kills:
        node = kill.victim + "@"
        looked: list[tuple[str, float, list[Any]]] = [(e["run_id"], float("-inf"), r.training) for e in kill.active]
        # Claimed by no one when Redis was read (at most ~0.1 s before the kill).
        looked += [(run_id, kill.at - 0.5, r.taken if task_id in kill.received else r.others)
                   for task_id, run_id in kill.unclaimed]
        for run_id, since, into in looked:
            record = records.get(run_id) or {}
            name = specs_by_id[run_id].name if run_id in specs_by_id else run_id
            took = next_start(record.get("history", []), node, kill, since)
            if took is None:
                r.finished_first.append(name)
            else:
                into.append((took, name, kill.victim))
        for task_id, _ in kill.unclaimed:
            if task_id in kill.received:  # how long the victim had held it unstarted
                r.held.append(kill.at - kill.received[task_id])
    return r


def report(what: str, times: list[tuple[float, str, str]], a: Audit) -> list[tuple[float, str, str]]:
    """Print the median and worst of `times`, and each at or over the goal; returns those."""
    secs = sorted(t for t, _, _ in times)
    late = [t for t in times if t[0] >= RESTART_GOAL]
    if not secs:
        print(f"{what}: none")
        return late
    print(f"{what}: {len(secs)}, median {statistics.median(secs):.1f} s, worst {secs[-1]:.1f} s, "
          f"{len(late)} at or over {RESTART_GOAL:g} s")
    for t, name, victim in sorted(late, reverse=True)[:10]:
        print(f"  {t:.1f} s: {name} (killed on {victim})")
    return late


# --- main --------------------------------------------------------------------------------

def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--runs", type=int, default=500, help="runs to train (rounded up to groups of 5)")
    p.add_argument("--workers", type=int, default=3, help="CPU training workers (one is killed at a time)")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill times, victims and run lengths")
    p.add_argument("--kill-min", type=float, default=4.0, help="shortest pause between kills (s)")
    p.add_argument("--kill-max", type=float, default=8.0, help="longest pause between kills (s)")
    p.add_argument("--min-alive", type=int, default=1,
                   help="training workers that must stay up after a kill (a kill waits until a restarted one is ready)")
    p.add_argument("--tmp-dir", default=None, help="where the results root and logs go")
    p.add_argument("--ref", default=None, help="run the workers from `git archive REF`")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    problems = []
    if args.runs < 1:
        problems.append(f"--runs must be >= 1, got {args.runs}")
    if args.workers < 2:
        problems.append(f"--workers must be >= 2 (one is killed while the others train), got {args.workers}")
    if not 0 <= args.min_alive < args.workers:
        problems.append(f"--min-alive must be >= 0 and below --workers ({args.workers}), got {args.min_alive}")
    if not 0 < args.kill_min <= args.kill_max:
        problems.append(f"--kill-min and --kill-max must satisfy 0 < min <= max, got {args.kill_min}, {args.kill_max}")
    if args.timeout <= 0:
        problems.append(f"--timeout must be > 0, got {args.timeout}")
    if args.tmp_dir is not None and not Path(args.tmp_dir).is_dir():
        problems.append(f"--tmp-dir {args.tmp_dir}: not an existing folder")
    if problems:
        p.print_usage(sys.stderr)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return args


def describe_tree(ref: str | None) -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True).stdout.strip()

    if ref:
        return f"git archive {ref} ({git('rev-parse', '--short', ref)})"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "orchestrator", "tasks")
    return f"working tree at {git('rev-parse', '--short', 'HEAD')}" + (" (orchestrator/tasks modified)" if dirty else "")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    args = options()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.tmp_dir)).resolve()
    tree = REPO
    if args.ref:
        from benchmarks.trees import export_ref

        try:
            tree = export_ref(args.ref, base / "tree", compiled=True)
        except subprocess.CalledProcessError as exc:
            print(f"error: --ref {args.ref}: git archive failed: {exc.stderr.decode(errors='replace').strip()}",
                  file=sys.stderr)
            shutil.rmtree(base, ignore_errors=True)
            return 2
    # Every process started here runs `python -m ...` from `tree`, whose folder comes
    # first on its sys.path (before PYTHONPATH): the workers run the code under test.
    os.chdir(tree)
    sys.path.insert(0, str(tree))  # the same code the workers run expands the plan
    os.environ["ORCH_TRAINER_MODULES"] = "tests.plugins"
    from orchestrator import settings
    load_experiments = project("experiment.config", "config").load_experiments
    expand = project("experiment.expand", "expand").expand
    from orchestrator.paths import Layout

    for name in ("ORCH_LEASE_SECONDS", "ORCH_WATCHDOG_INTERVAL"):
        os.environ.pop(name, None)
    print(f"chaos: {describe_tree(args.ref)}; lease {settings.value('ORCH_LEASE_SECONDS'):g} s, "
          f"watchdog {settings.value('ORCH_WATCHDOG_INTERVAL'):g} s (defaults); load average {loadavg()}")
    cfg = base / "chaos.yaml"
    write_config(cfg, args.runs, rng)
    specs = expand(load_experiments([str(cfg)])[0])
    specs_by_id = {s.run_id: s for s in specs}
    by_point_fold = {(s.point, s.fold): s.run_id for s in specs}
    by_key = {s.run_key: s.run_id for s in specs}
    counted: set[str] = set()
    firsts = list({s.group_id: s for s in specs}.values())
    soak: Soak | None = None
    watcher: CommitWatcher | None = None
    ok = False
    try:
        soak = Soak(base, tree, args.workers)
        layout = Layout(soak.root)
        watcher = CommitWatcher(soak.root)
        watcher.start()
        used = subprocess.run([sys.executable, "-c", "import orchestrator, tasks; print(orchestrator.__file__, tasks.__file__)"],
                              env=soak.env(), capture_output=True, text=True).stdout.split()
        if len(used) != 2 or not all(Path(u).is_relative_to(tree) for u in used):
            raise SoakError(f"the workers would not run the code under test ({tree}): {used}")
        for name in [*soak.training, "control"]:
            soak.start_worker(name)
        soak.wait_ready()
        print(f"{len(specs)} runs in {len(firsts)} groups, {args.workers} training workers + control; "
              f"watcher: {watcher.how}; folder {base}")
        submitted = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(cfg)], cwd=tree,
                                   env=soak.env(), capture_output=True, text=True, timeout=300)
        if submitted.returncode != 0:
            raise SoakError(f"submit exited {submitted.returncode}: {submitted.stderr.strip()[-800:]}")
        start = time.time()
        kills: list[Kill] = []
        next_kill = start + rng.uniform(args.kill_min, args.kill_max)
        final = 0
        last_note = start
        waits: list[float] = []
        waited_from: float | None = None
        while (final := groups_final(layout, firsts)) < len(firsts):
            now = time.time()
            if now - start > args.timeout:
                print(f"timeout: {final}/{len(firsts)} groups final after {args.timeout:g} s")
                break
            ready = [w for w in soak.training if soak.ready(w)] if now >= next_kill else []
            if now >= next_kill and len(ready) <= args.min_alive:
                # A kill now would leave fewer than --min-alive training workers up: no
                # run could be handed on at all, whatever the orchestrator does.
                waited_from = waited_from or now
            elif now >= next_kill and waited_from:
                # Drawn again from now, not at once: a kill right after a worker's
                # "ready." would nearly always land between its first pop and its claim.
                waits.append(now - waited_from)
                waited_from = None
                next_kill = now + rng.uniform(args.kill_min, args.kill_max)
            elif now >= next_kill:
                victim = rng.choice(ready)
                active, unclaimed = look(soak, victim, by_key, by_point_fold, counted)
                at, received = soak.kill(victim)
                after = look(soak, victim, by_key, by_point_fold, counted)
                soak.start_worker(victim, after_kill=at)  # a host that comes back at once
                active += after[0]
                training = {e["run_id"] for e in active}  # claimed between the two looks
                unclaimed = [u for u in unclaimed + after[1] if u[1] not in training]
                kills.append(Kill(at, victim, active, unclaimed, received))
                next_kill = at + rng.uniform(args.kill_min, args.kill_max)
            if now - last_note >= 30:
                print(f"  {now - start:5.0f} s: {final}/{len(firsts)} groups final, {len(kills)} kills, "
                      f"load {loadavg()}", flush=True)
                last_note = now
            time.sleep(0.25)
        elapsed = time.time() - start
        for name in soak.training:
            soak.ready(name)  # the last restarts' ready times
        time.sleep(1.0)  # the last renames reach the watcher
        watcher.stop()
        a, records = audit_disk(layout, specs, watcher, soak.root)
        r = restart_times(kills, specs_by_id, records)
        (base / "kills.json").write_text(json.dumps(
            [k.__dict__ for k in kills], indent=1, default=str))
        control = soak.log("control")
        f = a.figures
        print(f"runs {f['runs']}, DONE {f['DONE']}, FAILED {f['FAILED']}, duplicates {f['duplicates']}, "
              f"lost {f['lost']}, leftovers {f['leftovers']}, kills {len(kills)} "
              f"(groups DONE {f['groups_done']}, FAILED {f['groups_failed']}; final_results.csv rows "
              f"{f['csv_rows']}; {elapsed:.0f} s from submit to the last group)")
        print(f"  runs whose outputs were committed by a killed attempt and adopted by the next: {f['adopted']}; "
              f"attempt logs with no entry in their run's history: {f['unrecorded']}")
        for note in a.notes[:10]:
            print(f"  {note}")
        late = report("kill to restart (runs training on the victim)", r.training, a)
        print(f"  {len(r.finished_first)} more had just ended DONE when the victim was killed")
        late += report("kill to start (taken by the victim, not yet claimed)", r.taken, a)
        if r.held:
            print("  the victim had received them " + ", ".join(f"{h:.1f}" for h in r.held) + " s before the kill")
        slow = [t for t in r.others if t[0] > 5.0]
        print(f"delivered to a live worker, unclaimed at a kill: {len(r.others)}, {len(slow)} started "
              "more than 5 s after it" + (f" (worst {max(slow)[0]:.1f} s)" if slow else ""))
        up = sorted(soak.restarts)
        if up:
            print(f"worker restarts (kill to its \"ready.\"): median {statistics.median(up):.1f} s, worst {up[-1]:.1f} s; "
                  f"{len(waits)} times a kill waited for a restarted worker to be ready ({sum(waits):.0f} s in all, "
                  "then drawn again) "
                  f"(--min-alive {args.min_alive})")
        print(f"control log: {control.count('lapsed; its message is back')} lapsed leases handed back, "
              f"{control.count('delivered but never started')} messages restored as delivered but never started")
        if late:
            a.fail(f"{len(late)} runs (re)started {RESTART_GOAL:g} s or more after their worker was killed")
        for problem in a.problems[:30]:
            print(f"FAIL {problem}")
        if len(a.problems) > 30:
            print(f"FAIL ... and {len(a.problems) - 30} more")
        ok = not a.problems
        print(f"load average at the end {loadavg()}")
        print("OK: every invariant held" if ok else f"NOT OK; workers' logs kept in {soak.logs}")
    except SoakError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if watcher is not None and watcher.is_alive():
            watcher.stop()
        if soak is not None:
            soak.stop()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
