"""`orchestrator watch` shows the ranks of data-parallel runs under each run: worker,
host, GPU, step, last heartbeat, attempt (docs/data-parallel.md, "Watching"). The screen
from hand-built snapshots (no Redis), and the collector on a real redis-server reading
the gang records as `status` does (tests/test_data_parallel.py runs `watch --once` on
real gangs)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from orchestrator import keys
from orchestrator.views import dashboard
from orchestrator.views.dashboard import (
    ExperimentRow,
    GangRow,
    RankRow,
    Snapshot,
    WorkerRow,
    frame_text,
)

from .test_watch import line_with, lines_of


def snapshot(**changes: Any) -> Snapshot:
    now = time.time()
    run = "dp2/digits/base/seed=0"
    snap = Snapshot(
        "redis://head:6379/0", "/srv/results", now,
        experiments=[ExperimentRow("dp2", 2, 0, running=1, submitted_at=now)],
        workers=[WorkerRow("cpu1@node-b", "cpu", None, "busy", 1.0, f"[rank 1/2] {run}", now - 11, 1, {"epoch": 9}),
                 WorkerRow("cpu3@node-a", "cpu", None, "busy", 1.0, f"[rank 0/2] {run}", now - 11, 1, {"epoch": 11}),
                 WorkerRow("control@head", "control", None, "idle", 1.0)],
        gangs=[GangRow(run, "training", 1, 2, None,
                       [RankRow(0, "cpu3@node-a", "node-a", None, 11, 0.4, 1),
                        RankRow(1, "cpu1@node-b", "node-b", "0", 9, 7.2, 1, late=True)])])
    for key, value in changes.items():
        object.__setattr__(snap, key, value)
    return snap


def test_each_rank_is_a_line_under_its_run_with_host_gpu_step_beat_and_attempt() -> None:
    text = frame_text(snapshot(), 80, 24)
    lines = lines_of(text)
    assert max(len(line) for line in lines) <= 80 and len(lines) <= 24
    head = line_with(text, "DATA-PARALLEL")
    assert re.search(r"DATA-PARALLEL\s+WORKER\s+HOST\s+GPU\s+STEP\s+BEAT\s+ATTEMPT", head), head
    run = line_with(text, "gang training")
    assert run.startswith("digits/base/seed=0 · gang training · attempt 1 · 2 ranks"), run  # experiment left out
    at = lines.index(run)
    assert re.fullmatch(r"  rank 0\s+cpu3@node-a\s+node-a\s+-\s+step 11\s+0\.4s\s+1", lines[at + 1].rstrip()), lines[at + 1]
    assert re.fullmatch(r"  rank 1\s+cpu1@node-b\s+node-b\s+0\s+step 9\s+7\.2s\s+1", lines[at + 2].rstrip()), lines[at + 2]
    # The worker rows still say which rank they train: the tag whole, the run name cut after it.
    assert "[rank 1/2] digits/base/seed=0 " in line_with(text, "cpu1@node-b  ")
    narrow = frame_text(snapshot(), 50, 24)
    assert "[rank 1/2] " in line_with(narrow, "cpu1@node-b") and max(map(len, lines_of(narrow))) <= 50


def test_a_waiting_or_aborted_gang_says_why_and_short_terminals_cut_the_ranks() -> None:
    now = time.time()
    aborted = GangRow("dp2/digits/base/seed=0", "training", 2, 2, "rank 1 lost its lease (killed, paused or cut off)",
                      [RankRow(0, "cpu3@node-a", "node-a", None, None, 0.2, 2)])
    text = frame_text(snapshot(gangs=[aborted]), 120, 30)
    assert "gang training · attempt 2 · 2 ranks · rank 1 lost its lease (killed, paused or cut off)" in text
    assert re.search(r"  rank 0\s+cpu3@node-a\s+node-a\s+-\s+joining\s+0\.2s\s+2", text), text
    many = [GangRow(f"dp2/digits/base/seed={i}", "training", 1, 4,
                    None, [RankRow(r, f"cpu{r}@n{i}", f"n{i}", None, 3, 0.5, 1) for r in range(4)]) for i in range(6)]
    workers = [WorkerRow(f"cpu{i}@node", "cpu", None, "busy", 1.0, f"dp2/x/seed={i}", now - 5, 1, {"step": i})
               for i in range(10)]
    text = frame_text(snapshot(gangs=many, workers=workers), 80, 24)
    lines = lines_of(text)
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    assert re.search(r"… and \d+ more lines of ranks", text), text
    assert "dp2" in text and "DATA-PARALLEL" in text
    assert "DATA-PARALLEL" not in frame_text(snapshot(gangs=[]), 80, 24)  # no data-parallel run: no section


def test_the_collector_reads_the_gangs_of_the_runs_held_now(tmp_path: Path, write_experiment: Any) -> None:
    from orchestrator.cluster import registry
    from orchestrator.cluster.local import start_redis, stop_process
    from orchestrator.dispatch.manifest import write_manifest
    from orchestrator.execution.leases import ACTIVE
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand
    from orchestrator.experiment.plan import make_plan
    from orchestrator.paths import Layout

    layout = Layout(tmp_path / "results")
    exp = load_experiments([str(write_experiment("dpw", trainer="mlp", datasets=["iris"], folds=2,
                                                 resources={"gpus": 0, "ranks": 2}))])[0]
    plans = make_plan(layout, expand(exp))
    write_manifest(layout, exp, plans)
    run, other = [s for p in plans for s in p.specs]
    proc, url = start_redis(tmp_path / "redis")
    try:
        client = dashboard.redis_client(url)
        now = time.time()
        for name in ("w0@a", "w1@b"):
            registry.register(client, registry.WorkerRecord(name, name[-1], 1, None, "cpu", ["cpu"], "busy", now, now), 30)
        client.hset(ACTIVE, run.run_key, json.dumps({"token": "t", "worker": "w0@a", "name": run.name,
                                                     "experiment": "dpw", "started": now - 4, "attempt": 3}))
        client.hset(keys.gang(run.run_key), mapping={"attempt": 3, "world": 2, "state": "training", "why": ""})
        client.hset(keys.gang(other.run_key), mapping={"attempt": 1, "world": 2, "state": "waiting",
                                                       "why": "needs 2 free workers at once, 1 free"})  # not held
        for r, (worker, host) in enumerate((("w0@a", "a"), ("w1@b", "b"))):
            client.set(keys.rank(run.run_key, 3, r), json.dumps({
                "rank": r, "world": 2, "name": run.name, "worker": worker, "host": host, "gpu": None,
                "pid": 1, "attempt": 3, "step": 5 + r, "started": now - 4, "beat": now - 0.5}))
        client.set(keys.rank(run.run_key, 2, 1), json.dumps({"rank": 1, "worker": "w9@z"}))  # an older attempt's
        client.set(keys.rank(run.run_key, 3, 5), "not json")  # beyond its world: never read
        snap = dashboard.Collector(layout, client, url, heartbeat=5).collect()
        assert snap.error is None
        (gang,) = snap.gangs
        assert (gang.run, gang.state, gang.attempt, gang.world, gang.why) == (run.name, "training", 3, 2, None)
        assert [(r.rank, r.worker, r.host, r.step, r.attempt) for r in gang.ranks] == [(0, "w0@a", "a", 5, 3),
                                                                                      (1, "w1@b", "b", 6, 3)]
        assert all(r.beat_age is not None and 0.4 <= r.beat_age < 5 and not r.late for r in gang.ranks)
        rows = {w.name: w for w in snap.workers}
        assert rows["w1@b"].run == f"[rank 1/2] {run.name}" and rows["w1@b"].attempt == 3  # no run lease of its own
        text = frame_text(snap, 80, 24)
        assert re.search(r"  rank 1\s+w1@b\s+b\s+-\s+step 6\s+0\.\ds\s+3", text), text
        client.hset(keys.gang(run.run_key), "abort", "rank 1 lost its lease (killed, paused or cut off)")
        assert dashboard.Collector(layout, client, url, heartbeat=5).collect().gangs[0].why.startswith("rank 1 lost")
    finally:
        stop_process(proc)
