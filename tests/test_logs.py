"""Each run's stdout/stderr is kept next to its outputs; `orchestrator logs` shows it."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from .conftest import Cluster, run_cli

pytestmark = pytest.mark.integration


def test_logs_of_each_attempt_from_the_results_root_and_from_redis(
        running_cluster: Cluster, write_experiment: Any) -> None:
    cfg = write_experiment("chat", trainer="chatty", datasets=["iris"], folds=2,
                           params={"fail_fold": 1}, resources={"gpus": 0}, retries=1)
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env())
    assert proc.returncode == 1, proc.stderr
    status = json.loads(run_cli("status", "chat", "--json", env=running_cluster.env()).stdout)
    folds = {f["fold"]: f for f in status["group_details"][0]["folds"]}

    ok = run_cli("logs", folds[0]["name"], env=running_cluster.env())
    assert ok.returncode == 0, ok.stderr
    for line in ("hello from fold 0 on stdout", "warning from fold 0 on stderr",
                 "raw fd write from fold 0", "child process of fold 0"):
        assert line in ok.stdout
    assert "attempt 1" in ok.stderr and "fold 1" not in ok.stdout

    # The failing fold: two attempts (retries: 1), each with its output and traceback.
    bad = run_cli("logs", folds[1]["run_id"][:8], env=running_cluster.env())
    assert bad.returncode == 0, bad.stderr
    assert bad.stdout.count("hello from fold 1 on stdout") == 2
    assert bad.stdout.count("RuntimeError: chatty failure on fold 1") == 2
    assert "attempt 1" in bad.stderr and "attempt 2" in bad.stderr
    only2 = run_cli("logs", folds[1]["name"], "--attempt", "2", env=running_cluster.env())
    assert only2.stdout.count("hello from fold 1") == 1

    # Nothing leaked into the worker's own log.
    assert "hello from fold" not in running_cluster.log("cpu1") + running_cluster.log("cpu2")

    # A host without the shared results root: the tails kept in Redis.
    group_dir = running_cluster.root / "chat" / "iris" / "base" / "seed=0"
    shutil.rmtree(group_dir / "logs")
    no_broker = {**running_cluster.env(), "ORCH_BROKER_URL": ""}
    gone = run_cli("logs", folds[0]["name"], env=no_broker)
    assert gone.returncode == 2 and "no log of" in gone.stderr and "--broker" in gone.stderr
    remote = run_cli("logs", folds[0]["name"], env=running_cluster.env())
    assert remote.returncode == 0 and "hello from fold 0 on stdout" in remote.stdout
    assert "redis orch:log:" in remote.stderr


def test_logs_of_an_unknown_run_is_a_clear_error(running_cluster: Cluster) -> None:
    proc = run_cli("logs", "nope/iris/base/seed=0/fold=0", env=running_cluster.env())
    assert proc.returncode == 2 and "no run 'nope/iris/base/seed=0/fold=0'" in proc.stderr
