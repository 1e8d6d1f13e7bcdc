"""Pause and resume with real workers: no run lost, none run twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import keys

from .conftest import Cluster, run_cli, wait_for

pytestmark = pytest.mark.integration


def _client(cluster: Cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.url)


def parked(cluster: Cluster, experiment: str) -> int:
    client = _client(cluster)
    return sum(int(client.llen(k)) for k in client.scan_iter(f"parked.{experiment}*"))


def active(cluster: Cluster, experiment: str) -> dict[str, dict[str, Any]]:
    raw = _client(cluster).hgetall("orch:active")
    entries = {k.decode(): json.loads(v) for k, v in raw.items()}
    return {k: e for k, e in entries.items() if e.get("experiment") == experiment and e.get("token")}


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    proc = run_cli("status", name, "--json", env=cluster.env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def fold_states(cluster: Cluster, name: str) -> list[str]:
    return [f["state"] for f in status(cluster, name)["group_details"][0]["folds"]]


def committed_once(cluster: Cluster, name: str) -> None:
    client = _client(cluster)
    group = status(cluster, name)["group_details"][0]
    assert group["state"] == "DONE", group
    for f in group["folds"]:
        assert client.hget(f"orch:attempts:{f['run_key']}", "committed") == b"1", f
    assert client.get(keys.group_finalized(name, group["group_id"])) == b"1"
    rows = (cluster.root / name / "final_results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(group["folds"])


def test_pause_lets_running_runs_finish_and_holds_the_rest_until_resume(
        running_cluster: Cluster, write_experiment: Any) -> None:
    name = "paused_exp"
    # 6 s runs: `pause` must land while the first two train (a CLI start under load: seconds).
    cfg = write_experiment(name, trainer="slow", datasets=["iris"], folds=4,
                           params={"seconds": 6.0}, resources={"gpus": 0})
    assert run_cli("submit", str(cfg), env=running_cluster.env()).returncode == 0
    wait_for(lambda: len(active(running_cluster, name)) == 2, timeout=60, what="2 runs training")
    proc = run_cli("pause", name, env=running_cluster.env())
    assert proc.returncode == 0 and "paused; running runs finish" in proc.stdout, proc.stderr
    # The two running runs finish; the two others wait, parked, and do not start.
    wait_for(lambda: parked(running_cluster, name) == 2 and fold_states(running_cluster, name).count("DONE") == 2,
             timeout=60, what="2 runs DONE and 2 parked",
             seen=lambda: (parked(running_cluster, name), fold_states(running_cluster, name),
                           active(running_cluster, name)))
    assert active(running_cluster, name) == {}
    text = run_cli("status", name, env=running_cluster.env()).stdout
    assert f"{name} PAUSED" in text
    assert status(running_cluster, name)["paused"]["now"] is False
    proc = run_cli("resume", name, env=running_cluster.env())
    assert proc.returncode == 0 and "2 waiting runs back on their queues" in proc.stdout, proc.stderr
    wait_for(lambda: status(running_cluster, name)["group_details"][0]["state"] == "DONE",
             timeout=60, what="the group to finish after resume")
    assert parked(running_cluster, name) == 0
    assert status(running_cluster, name)["paused"] is None
    committed_once(running_cluster, name)


def test_pause_now_hands_running_runs_back(running_cluster: Cluster, write_experiment: Any) -> None:
    name = "paused_now"
    cfg = write_experiment(name, trainer="slow", datasets=["iris"], folds=3,
                           params={"seconds": 6.0}, resources={"gpus": 0})
    assert run_cli("submit", str(cfg), env=running_cluster.env()).returncode == 0
    wait_for(lambda: len(active(running_cluster, name)) == 2, timeout=60, what="2 runs training")
    proc = run_cli("pause", name, "--now", env=running_cluster.env())
    assert proc.returncode == 0 and "2 running runs handed back" in proc.stdout, proc.stdout
    # Nothing finishes: every run ends up parked (the two handed back ones included).
    wait_for(lambda: parked(running_cluster, name) == 3, timeout=30, what="all 3 runs parked")
    assert active(running_cluster, name) == {}
    assert "DONE" not in fold_states(running_cluster, name)
    staging = [p for p in Path(running_cluster.root / name).rglob("*") if p.parent.name == ".staging"]
    assert staging == []
    proc = run_cli("resume", name, env=running_cluster.env())
    assert proc.returncode == 0 and "3 waiting runs back" in proc.stdout, proc.stdout
    wait_for(lambda: status(running_cluster, name)["group_details"][0]["state"] == "DONE",
             timeout=120, what="the group to finish after resume")
    committed_once(running_cluster, name)


def test_pause_of_an_unknown_experiment_is_a_clear_error(running_cluster: Cluster) -> None:
    proc = run_cli("pause", "no_such_exp", env=running_cluster.env())
    assert proc.returncode == 2 and "no experiment 'no_such_exp'" in proc.stderr


def test_steering_commands_need_a_broker(tmp_path: Path) -> None:
    from .conftest import cli_env

    for command in ("pause", "resume", "cancel"):
        proc = run_cli(command, "x", env=cli_env(ORCH_RESULTS_ROOT=str(tmp_path)))
        assert proc.returncode == 2 and "no broker configured" in proc.stderr, (command, proc.stderr)
