"""Searches on a real Redis with real workers: to the end, with 1 and 2 workers, with
failing and repeated proposals, and with the control worker killed and the command
run again. "Evaluations" are counted from the fold records: every attempt of a run
leaves one entry in its history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.collect.status import read_fold_status
from orchestrator.paths import Layout
from orchestrator.search.engine import load_search, read_history

from .conftest import cli_env, run_cli, wait_for
from .test_faults import FaultCluster

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SPACE = {"x": {"uniform": [-4, 4]}, "y": {"uniform": [-4, 4]}, "kind": {"choice": ["a", "b", "c"]}}
TPE = {"strategy": "tpe", "metric": "reported.score", "trials": 8, "parallel": 4, "seed": 11, "space": SPACE}


class SearchCluster(FaultCluster):
    """Short leases and a quick watchdog: a lost run or callback is found in seconds."""

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(ORCH_LEASE_SECONDS="3", ORCH_WATCHDOG_INTERVAL="0.5", **extra)


@pytest.fixture(scope="module")
def sc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    """A private Redis, two CPU workers and a control worker (restartable)."""
    c = SearchCluster(tmp_path_factory.mktemp("search"))
    c.start_redis()
    try:
        c.ensure_workers()
        yield c
    finally:
        c.stop()


def config(tmp_path: Path, name: str, search: dict[str, Any], **params: Any) -> Path:
    doc = {"experiment": name, "trainer": "objective", "datasets": ["iris"], "split": {"validation": 0.25},
           "holdout": 0,
           "resources": {"gpus": 0}, "params": {"epochs": 3, **params}, "search": search}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def proposals(root: Path, name: str) -> list[dict[str, Any]]:
    return [t.params for t in read_history(Layout(root), name).ordered]


def evaluations(root: Path, name: str, outcome: str | None = None) -> dict[str, int]:
    """run name -> its attempts (with `outcome`: those that ended so, e.g. DONE: the
    evaluations that completed), over every trial's runs (each run once)."""
    layout = Layout(root)
    search = load_search(layout, name)
    assert search is not None
    counts = {}
    for trial in read_history(layout, name).ordered:
        for spec in search.specs(trial):
            record = read_fold_status(layout, spec) or {}
            counts[spec.name] = sum(1 for h in record.get("history") or []
                                    if outcome is None or h.get("outcome") == outcome)
    return counts


def best_json(root: Path, name: str, top: int = 3) -> dict[str, Any]:
    proc = run_cli("search", "best", name, "--top", str(top), "--json", "--results-root", str(root))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_tpe_search_runs_to_the_end_with_the_same_proposals_on_1_and_2_workers(
        sc: FaultCluster, tmp_path: Path) -> None:
    cfg = config(tmp_path, "tpe_two", TPE)
    planned = run_cli("plan", str(cfg), "--json", "--results-root", str(sc.root))
    assert planned.returncode == 0, planned.stderr
    (plan,) = json.loads(planned.stdout)
    assert plan["search"]["strategy"] == "tpe" and plan["progress"]["proposed"] == 0
    two = run_cli("submit", str(cfg), "--wait", env=sc.env(), timeout=180)
    assert two.returncode == 0, two.stderr
    # `plan` showed the first batch the search then recorded
    assert [n["params"] for n in plan["next"]] == proposals(sc.root, "tpe_two")[:4]
    local_root = tmp_path / "local"
    one = run_cli("run", str(config(tmp_path, "tpe_one", TPE)), "--workers", "1",
                  "--results-root", str(local_root), timeout=180)
    assert one.returncode == 0, one.stderr
    assert "tpe_one: best 5 trials" in one.stdout

    assert len(proposals(sc.root, "tpe_two")) == 8
    assert proposals(local_root, "tpe_one") == proposals(sc.root, "tpe_two")
    history = read_history(Layout(sc.root), "tpe_two")
    assert [t.state for t in history.ordered] == ["COMPLETE"] * 8
    assert set(evaluations(sc.root, "tpe_two").values()) == {1}  # each run trained once
    scores = [t.values[0] for t in history.ordered if t.values]
    best = best_json(sc.root, "tpe_two")
    assert [t["score"] for t in best["trials"]] == sorted(scores, reverse=True)[:3]
    assert best["progress"]["finished"] and best["progress"]["complete"] == 8
    top = best["trials"][0]
    assert set(top["params"]) == {"x", "y", "kind"}
    for group in top["groups"]:
        record = json.loads(Path(group["status.json"]).read_text())
        assert record["train_status"] == "DONE"
        assert record["metrics"]["reported"]["score"] == pytest.approx(top["score"])
        assert Path(group["metrics.json"]).exists()

    st = json.loads(run_cli("status", "tpe_two", "--json", "--results-root", str(sc.root)).stdout)
    assert st["search"]["complete"] == 8 and st["search"]["finished"] and len(st["search"]["trial_details"]) == 8
    assert st["search"]["best"]["number"] == best["trials"][0]["number"]
    assert st["groups"] == {"DONE": 8}
    report = run_cli("report", "tpe_two", "--results-root", str(sc.root))
    assert report.returncode == 0, report.stderr
    page = (sc.root / "tpe_two" / "report.html").read_text()
    assert 'id="search"' in page and 'id="search-best"' in page
    for figure in ("search_best_so_far", "search_vs_x", "search_vs_y", "search_vs_kind"):
        assert (sc.root / "tpe_two" / "report_files" / f"{figure}.png").stat().st_size > 0

    again = run_cli("submit", str(cfg), "--wait", env=sc.env(), timeout=60)
    assert again.returncode == 0, again.stderr  # already ended: nothing new is proposed
    assert len(proposals(sc.root, "tpe_two")) == 8


def test_evolution_with_failing_and_repeated_points_ends_and_trains_each_point_once(
        sc: FaultCluster, tmp_path: Path) -> None:
    search = {"strategy": "evolution", "metric": "reported.score", "seed": 3,
              "space": {"x": {"choice": [0.0, 1.0, 3.0]}, "y": {"choice": [-2.0, 0.0]}},
              "evolution": {"population": 4, "generations": 3, "elitism": 1, "tournament": 2}}
    proc = run_cli("submit", str(config(tmp_path, "evo", search, fail_above=2.0)), "--wait",
                   env=sc.env(), timeout=180)
    assert proc.returncode == 0, proc.stderr  # failed trials do not fail the search
    trials = read_history(Layout(sc.root), "evo").ordered
    assert len(trials) == 4 + 2 * 3
    for t in trials:
        if t.params["x"] == 3.0:
            assert t.state == "FAILED" and "deliberate failure" in (t.error or ""), t
        else:
            assert t.state == "COMPLETE" and t.values
    assert any(t.state == "FAILED" for t in trials)
    points = {t.point for t in trials}
    assert len(points) < len(trials)  # proposals repeated a point...
    counts = evaluations(sc.root, "evo")
    assert len(counts) == len(points) and set(counts.values()) == {1}  # ...trained once each
    assert "FAILED trial" in proc.stderr and "deliberate failure" in proc.stderr


def test_a_search_stops_after_max_failed_trials_with_exit_1(sc: FaultCluster, tmp_path: Path) -> None:
    search = {**TPE, "strategy": "random", "trials": 6, "parallel": 2, "max_failed_trials": 0,
              "space": {"x": {"uniform": [3, 4]}}}
    proc = run_cli("submit", str(config(tmp_path, "allfail", search, fail_above=2.0)), "--wait",
                   env=sc.env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "stopped" in proc.stderr and "max_failed_trials=0" in proc.stderr
    trials = read_history(Layout(sc.root), "allfail").ordered
    assert [t.state for t in trials] == ["FAILED", "FAILED"]  # no batch after the failures


def test_a_trial_past_its_timeout_fails_and_the_search_goes_on(sc: FaultCluster, tmp_path: Path) -> None:
    search = {"strategy": "random", "metric": "reported.score", "trials": 4, "parallel": 2, "seed": 2,
              "space": {"seconds": {"choice": [0.0, 1.0]}, "x": {"uniform": [-1, 1]}}}
    doc = yaml.safe_load(config(tmp_path, "straggler", search).read_text())
    doc["timeout"] = 1.5  # 3 epochs of 1 s: past it
    path = tmp_path / "straggler.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli("submit", str(path), "--wait", env=sc.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    trials = read_history(Layout(sc.root), "straggler").ordered
    assert len(trials) == 4
    for t in trials:
        if t.params["seconds"] == 1.0:
            assert t.state == "FAILED" and "exceeded its timeout of 1.5 s" in (t.error or ""), t
        else:
            assert t.state == "COMPLETE"
    assert {t.state for t in trials} == {"FAILED", "COMPLETE"}


def test_killing_the_control_worker_then_submitting_again_ends_the_same_search(
        sc: FaultCluster, tmp_path: Path) -> None:
    reference = run_cli("submit", str(config(tmp_path, "ref", TPE)), "--wait", env=sc.env(), timeout=180)
    assert reference.returncode == 0, reference.stderr
    slow = config(tmp_path, "killed", TPE, seconds=0.3)  # each run ~1 s: the kill lands mid-search
    assert run_cli("submit", str(slow), env=sc.env()).returncode == 0
    layout = Layout(sc.root)
    wait_for(lambda: read_history(layout, "killed").count("COMPLETE") >= 2, timeout=90,
             what="two trials of the search to complete")
    sc.kill_worker("control")
    sc.workers["control"].wait(timeout=30)
    at_kill = read_history(layout, "killed")
    assert at_kill.count("COMPLETE") < 8 and at_kill.count("RUNNING") > 0  # killed mid-search
    sc.ensure_workers()  # a new control worker
    again = run_cli("submit", str(slow), "--wait", env=sc.env(), timeout=240)
    assert again.returncode == 0, again.stderr

    assert proposals(sc.root, "killed") == proposals(sc.root, "ref")
    assert [t.state for t in read_history(layout, "killed").ordered] == ["COMPLETE"] * 8
    counts = evaluations(sc.root, "killed")
    assert len(counts) == 8 and set(counts.values()) == {1}  # 0 re-evaluations, 0 duplicates
    ref = {t.number: t.values for t in read_history(layout, "ref").ordered}
    assert {t.number: t.values for t in read_history(layout, "killed").ordered} == ref


def test_a_training_worker_killed_mid_search_loses_nothing(sc: FaultCluster, tmp_path: Path) -> None:
    search = {**TPE, "strategy": "random", "trials": 4, "parallel": 2, "seed": 9}
    cfg = config(tmp_path, "trainkill", search, seconds=3.0)  # still training when the kill lands, under load
    assert run_cli("submit", str(cfg), env=sc.env()).returncode == 0
    entry = next(iter(sc.wait_running("trainkill").values()))
    victim = sc.worker_named(entry["worker"])
    sc.kill_worker(victim)  # SIGKILL of the whole worker, mid-run
    sc.workers[victim].wait(timeout=30)
    sc.ensure_workers()
    done = run_cli("submit", str(cfg), "--wait", env=sc.env(), timeout=180)
    assert done.returncode == 0, done.stderr
    trials = read_history(Layout(sc.root), "trainkill").ordered
    assert [t.state for t in trials] == ["COMPLETE"] * 4
    assert set(evaluations(sc.root, "trainkill", "DONE").values()) == {1}  # each run completed once
    assert max(evaluations(sc.root, "trainkill").values()) == 2  # the killed attempt, then its successor


EVOLUTION = {"strategy": "evolution", "metric": "reported.score", "seed": 4, "space": SPACE,
             "evolution": {"population": 4, "generations": 2, "elitism": 1, "tournament": 2}}


def test_redis_restarted_and_commands_killed_mid_search_end_the_same_search(
        sc: FaultCluster, tmp_path: Path) -> None:
    reference = run_cli("submit", str(config(tmp_path, "evo_ref", EVOLUTION)), "--wait", env=sc.env(),
                        timeout=180)
    assert reference.returncode == 0, reference.stderr
    expected = proposals(sc.root, "evo_ref")
    layout = Layout(sc.root)

    # 1. Redis killed (it persists: append-only file) and `submit --wait` killed, mid-search.
    slow = config(tmp_path, "evo_redis", EVOLUTION, seconds=0.3)
    waiter = subprocess.Popen([sys.executable, "-m", "orchestrator", "submit", str(slow), "--wait"],
                              env=sc.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: read_history(layout, "evo_redis").count("COMPLETE") >= 1, timeout=90,
             what="a trial to complete")
    done_before = {t.number for t in read_history(layout, "evo_redis").ordered if t.state == "COMPLETE"}
    sc.stop_redis(signal.SIGKILL)
    waiter.kill()
    waiter.wait()
    sc.start_redis(persist=True)
    again = run_cli("submit", str(slow), "--wait", env=sc.env(), timeout=240)
    assert again.returncode == 0, again.stderr
    assert proposals(sc.root, "evo_redis") == expected
    assert [t.state for t in read_history(layout, "evo_redis").ordered] == ["COMPLETE"] * 7
    # Each run completed once (0 duplicates); a run in flight at the outage may have lost
    # an attempt and been adopted by the next; a trial complete before it trained nothing more.
    assert set(evaluations(sc.root, "evo_redis", "DONE").values()) == {1}
    attempts = evaluations(sc.root, "evo_redis")
    search = load_search(layout, "evo_redis")
    assert search is not None
    for t in read_history(layout, "evo_redis").ordered:
        if t.number in done_before:
            assert all(attempts[spec.name] == 1 for spec in search.specs(t))

    # 2. `run` (local mode) killed with its private Redis and workers, then run again.
    root = tmp_path / "local"
    argv = [sys.executable, "-m", "orchestrator", "run", str(config(tmp_path, "evo_run", EVOLUTION, seconds=0.3)),
            "--results-root", str(root)]
    killed = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    local = Layout(root)
    wait_for(lambda: read_history(local, "evo_run").count("COMPLETE") >= 2, timeout=120,
             what="two trials to complete")
    done_before = {t.number for t in read_history(local, "evo_run").ordered if t.state == "COMPLETE"}
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    rerun = run_cli(*argv[3:], timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert proposals(root, "evo_run") == expected
    assert set(evaluations(root, "evo_run", "DONE").values()) == {1}  # each run completed once
    counts = evaluations(root, "evo_run")
    search = load_search(local, "evo_run")
    assert search is not None
    for t in read_history(local, "evo_run").ordered:
        assert t.state == "COMPLETE"
        for spec in search.specs(t):  # a trial complete at the kill: not trained again
            assert counts[spec.name] == 1 if t.number in done_before else counts[spec.name] <= 2


def test_asha_stops_poor_trials_mid_run_from_their_reports(sc: FaultCluster, tmp_path: Path) -> None:
    """Each trial one run to 27 epochs of 0.25 s; its reports at epochs 1, 3 and 9 are
    judged by the search's steps, and a poor trial's run is stopped mid-training: PRUNED
    with its rung and value, its fold CANCELLED, its worker on to its next run well
    before the run could have ended."""
    search = {"strategy": "random", "metric": "reported.score", "trials": 9, "parallel": 2, "seed": 5,
              "space": SPACE, "asha": {"min_epochs": 1, "max_epochs": 27, "reduction_factor": 3}}
    doc = yaml.safe_load(config(tmp_path, "asha", search, seconds=0.25).read_text())
    del doc["params"]["epochs"]  # ASHA sets it: max_epochs
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli("submit", str(path), "--wait", env=sc.env(), timeout=180)
    assert proc.returncode == 0, proc.stderr
    layout = Layout(sc.root)
    found = load_search(layout, "asha")
    assert found is not None
    trials = read_history(layout, "asha").ordered
    assert len(trials) == 9
    pruned = [t for t in trials if t.state == "PRUNED"]
    full = [t for t in trials if t.state == "COMPLETE"]
    assert len(pruned) >= 3 and full and len(pruned) + len(full) == 9, [(t.state, t.error) for t in trials]
    starts: list[tuple[str, float]] = []  # (worker, started_at) of every attempt of the search
    for t in trials:
        for spec in found.specs(t):
            record = read_fold_status(layout, spec) or {}
            starts += [(h["worker"], h["started_at"]) for h in record.get("history") or []]
    gaps = []
    for t in pruned:
        assert t.budget in (1, 3, 9) and t.error and f"pruned by ASHA at epoch {t.budget}: reported.score" in t.error
        assert t.stopped and max(t.rungs) == t.budget
        (spec,) = found.specs(t)
        record = read_fold_status(layout, spec) or {}
        assert record["status"] == "CANCELLED" and "pruned by ASHA" in record["error"], record
        (attempt,) = record["history"]
        later = [at for w, at in starts if w == attempt["worker"] and at > attempt["started_at"]]
        if later:  # the worker's next run began before this one could have trained 27 epochs
            gaps.append(min(later) - attempt["started_at"])
    assert gaps and max(gaps) < 27 * 0.25, gaps
    for t in full:  # trained to max_epochs, judged at every rung
        assert sorted(t.rungs) == [1, 3, 9] and t.budget == 27
        (spec,) = found.specs(t)
        record = read_fold_status(layout, spec) or {}
        meta = json.loads(layout.fold_files(spec)["metadata.json"].read_text())
        assert record["status"] == "DONE" and meta["last_report"]["epoch"] == 27
    best = best_json(sc.root, "asha", top=1)
    assert best["progress"]["pruned"] == len(pruned) and best["progress"]["finished"]
    assert best["trials"][0]["number"] in {t.number for t in full}
    assert max(t.rungs[1] for t in trials if 1 in t.rungs) == max(t.rungs[1] for t in full)  # the best went on
    print(f"pruned {len(pruned)}/9; a pruned run's worker started its next run after {sorted(gaps)} s "
          f"(a full run: {27 * 0.25:.2f} s)")


def test_search_best_of_an_unknown_experiment_is_exit_2(tmp_path: Path) -> None:
    proc = run_cli("search", "best", "nothing", "--results-root", str(tmp_path), env=cli_env())
    assert proc.returncode == 2 and "no search 'nothing'" in proc.stderr
