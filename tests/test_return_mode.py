"""Workers without the shared results root (`orchestrator worker --return-results`):
runs train in a scratch folder, their files come back through Redis, and the control
worker writes them under the root. Real redis-server, real Celery workers."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.cluster.local import spawn, start_redis, stop_process, stop_processes
from orchestrator.collect.finalize import finalize_group
from orchestrator.collect.status import fold_is_done
from orchestrator.execution import transfer
from orchestrator.execution.returns import Returns, ReturnSink, collect
from orchestrator.execution.runner import WorkerInfo, execute
from orchestrator.experiment.spec import RunSpec
from orchestrator.paths import FOLD_FILES, Layout

from .conftest import Cluster, celery_app, run_cli, wait_for

pytestmark = pytest.mark.integration

LIMIT_MB = "0.05"  # 51.2 KiB: every fold of iris fits, the `bulky` trainer's fold does not


class ReturnCluster(Cluster):
    remote: Path  # the training host's own disk: its ORCH_RESULTS_ROOT, never written
    scratch: Path  # where it trains (ORCH_SCRATCH_DIR)

    def env(self, **extra: str) -> dict[str, str]:
        return {**super().env(ORCH_RETURN_MAX_MB=LIMIT_MB), **extra}


@pytest.fixture(scope="module")
def return_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReturnCluster]:
    """Its own Redis; a CPU worker in return mode whose ORCH_RESULTS_ROOT is a private
    folder (another host's disk), and a control worker with the real results root."""
    base = tmp_path_factory.mktemp("return-mode")
    redis_proc, url = start_redis(base / "redis")
    cluster = ReturnCluster(url, base / "results", base / "logs", {})
    cluster.remote, cluster.scratch = base / "gpu-host-results", base / "gpu-host-scratch"
    for folder in (cluster.root, cluster.logs, cluster.remote, cluster.scratch):
        folder.mkdir()
    worker = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
    remote_env = cluster.env(ORCH_RESULTS_ROOT=str(cluster.remote), ORCH_SCRATCH_DIR=str(cluster.scratch))
    app = celery_app(url)
    try:
        cluster.processes["cpu1"] = spawn([*worker, "--cpu", "--accept-gpu-runs", "--return-results",
                                           "--name", "cpu1@%h"], remote_env, cluster.logs / "cpu1.log")
        cluster.processes["control"] = spawn([*worker, "--control"], cluster.env(), cluster.logs / "control.log")
        wait_for(lambda: len(app.control.ping(timeout=0.5)) >= 2, timeout=60, what="2 workers to answer ping")
        yield cluster
    finally:
        stop_processes(cluster.processes.values())
        stop_process(redis_proc)


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    proc = run_cli("status", name, "--json", env=cluster.env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _left_behind(cluster: ReturnCluster) -> list[Path]:
    """What the training host left on its own disk, or in its scratch folder."""
    return [*cluster.remote.rglob("*"), *cluster.scratch.rglob("*")]


def _waiting_archives(cluster: Cluster) -> list[bytes]:
    return list(redis.Redis.from_url(cluster.url).scan_iter("orch:return:*"))


def test_kfold_experiment_comes_back_under_the_control_root(return_cluster: ReturnCluster,
                                                            write_experiment: Any) -> None:
    cluster = return_cluster
    cfg = write_experiment("ret_kfold", trainer="mlp", datasets=["iris"], folds=5, seeds=[42],
                           params={"hidden": [32], "epochs": 60, "batch_size": 16, "lr": 0.01},
                           resources={"gpus": 0})
    proc = run_cli("submit", str(cfg), "--wait", env=cluster.env())
    assert proc.returncode == 0, proc.stderr + cluster.log("control")
    status = _status(cluster, "ret_kfold")
    assert status["runs"] == {"DONE": 5} and status["groups"] == {"DONE": 1}
    (group,) = status["group_details"]
    assert group["metrics"]["oof"]["accuracy"] > 0.9 and group["metrics"]["ensemble_holdout"]["accuracy"] > 0.9
    for fold in group["folds"]:
        record = json.loads(Path(fold["status_file"]).read_text())
        assert record["status"] == "DONE" and record["transfer"] == "return"
        assert record["worker"].startswith("cpu1@") and record["returned"]["bytes"] > 0
        assert [h["outcome"] for h in record["history"]] == ["DONE"]
        sizes = {name: Path(path).stat().st_size for name, path in fold["files"].items()}
        assert record["files"] == sizes and all(sizes.values())
        meta = json.loads(Path(fold["files"]["metadata.json"]).read_text())
        assert meta["metrics"] == record["metrics"] and meta["worker"] == record["worker"]
        with open(fold["files"]["predictions.csv"], newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == meta["n_val"] + meta["n_holdout"]
    with open(status["final_results"], newline="") as fh:
        final = list(csv.DictReader(fh))
    assert sorted(int(r["fold"]) for r in final) == [0, 1, 2, 3, 4]
    assert all(r["worker"].startswith("cpu1@") and float(r["accuracy"]) > 0.6 for r in final)
    assert not list(Path(group["dir"]).glob(".staging/*"))
    assert _left_behind(cluster) == [] and _waiting_archives(cluster) == []
    # Resume: everything is DONE under the root, nothing is sent again.
    again = run_cli("submit", str(cfg), "--wait", env=cluster.env())
    assert again.returncode == 0 and "0 runs in 0 groups" in again.stderr


def test_outputs_over_the_limit_fail_the_run_clearly_and_a_resume_runs_only_it(
        return_cluster: ReturnCluster, write_experiment: Any, tmp_path: Path) -> None:
    cluster = return_cluster
    small_now = tmp_path / "small-now"
    cfg = write_experiment("ret_big", trainer="bulky", datasets=["iris"], folds=3, resources={"gpus": 0},
                           params={"bulk_fold": 1, "bulk_kb": 256, "unless": str(small_now)})
    proc = run_cli("submit", str(cfg), "--wait", env=cluster.env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    status = _status(cluster, "ret_big")
    (group,) = status["group_details"]
    folds = {f["fold"]: f for f in group["folds"]}
    assert group["state"] == "FAILED" and folds[0]["state"] == folds[2]["state"] == "DONE"
    error = folds[1]["error"]
    assert folds[1]["state"] == "FAILED" and error.startswith("PayloadTooLarge: ret_big/iris/base/seed=0/fold=1")
    assert "over the limit of 51.2 KiB compressed" in error and "ORCH_RETURN_MAX_MB=0.05" in error
    assert "shared results root" in error and "raise ORCH_RETURN_MAX_MB" in error
    assert "PayloadTooLarge" in group["failed"]["1"] and "ret_big/iris/base/seed=0/fold=1" in proc.stderr
    group_dir = Path(group["dir"])
    assert not (group_dir / "fold_1").exists() and not list(group_dir.glob(".staging/*"))
    record = json.loads((group_dir / "status/fold_1.json").read_text())
    assert record["worker"].startswith("cpu1@") and [h["outcome"] for h in record["history"]] == ["FAILED"]
    done_before = {i: (group_dir / f"status/fold_{i}.json").read_text() for i in (0, 2)}
    assert _left_behind(cluster) == [] and _waiting_archives(cluster) == []

    small_now.touch()  # same run ids; now its outputs fit
    again = run_cli("submit", str(cfg), "--wait", env=cluster.env(), timeout=120)
    assert again.returncode == 0, again.stderr
    assert "submitted ret_big: 1 runs in 1 groups" in again.stderr
    status = _status(cluster, "ret_big")
    assert status["runs"] == {"DONE": 3} and status["groups"] == {"DONE": 1}
    assert {i: (group_dir / f"status/fold_{i}.json").read_text() for i in (0, 2)} == done_before
    record = json.loads((group_dir / "status/fold_1.json").read_text())
    assert [h["outcome"] for h in record["history"]] == ["FAILED", "DONE"] and record["attempt"] == 2
    assert _left_behind(cluster) == []


def test_status_shows_running_and_returned_folds_from_redis(return_cluster: ReturnCluster,
                                                            write_experiment: Any) -> None:
    cluster = return_cluster
    cfg = write_experiment("ret_live", trainer="slow", datasets=["iris"], folds=2, resources={"gpus": 0},
                           params={"seconds": 12})
    assert run_cli("submit", str(cfg), env=cluster.env()).returncode == 0

    def seen() -> dict[str, Any] | None:
        folds = _status(cluster, "ret_live")["group_details"][0]["folds"]
        return {f["state"]: f for f in folds} if {f["state"] for f in folds} == {"RETURNED", "IN_PROGRESS"} else None

    # One worker: the second fold trains (12 s: several `status` calls, even on a loaded
    # machine; with 6 s it once ended before the last of them) while the first one's
    # files wait in Redis.
    states = wait_for(seen, timeout=60, what="one fold RETURNED and one IN_PROGRESS")
    running = states["IN_PROGRESS"]
    assert running["worker"].startswith("cpu1@") and running["attempt"] == 1 and running["elapsed"] is not None
    # (from Redis: the worker cannot write the fold's status file, and nobody else has yet)
    assert not (cluster.root / f"ret_live/iris/base/seed=0/status/fold_{running['fold']}.json").exists()
    plain = run_cli("status", "ret_live", env=cluster.env())
    assert "RETURNED" in plain.stdout and "IN_PROGRESS" in plain.stdout
    without_redis = json.loads(run_cli("status", "ret_live", "--json",
                                       env=cluster.env(ORCH_BROKER_URL="")).stdout)
    assert {f["state"] for f in without_redis["group_details"][0]["folds"]} <= {"NEW", "PENDING"}
    wait_for(lambda: _status(cluster, "ret_live")["groups"] == {"DONE": 1}, timeout=60, what="the group DONE")
    assert _left_behind(cluster) == []


# --- the two sides without Celery: worker-side sink and control-side collect, real Redis ---

KIB64 = 64 * 1024


@pytest.fixture
def returns(redis_url: str) -> Returns:
    return Returns(redis.Redis.from_url(redis_url), ttl=600)


def _runs(write_experiment: Any, name: str, folds: int = 2) -> list[RunSpec]:
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand

    cfg = write_experiment(name, trainer="prior", datasets=["iris"], folds=folds)
    return expand(load_experiments([str(cfg)])[0])


def _return(spec: RunSpec, returns: Returns, tmp_path: Path, attempt: int = 1) -> dict[str, Any]:
    """One attempt on a worker without the results root (its own root stays empty)."""
    (tmp_path / "scratch").mkdir(exist_ok=True)
    sink = ReturnSink(returns, KIB64, str(tmp_path / "scratch"))
    try:
        return execute(spec, Layout(tmp_path / "worker-root"), WorkerInfo("w1@gpuhost", "cpu", None), attempt,
                       sink=sink)
    finally:
        sink.cleanup()


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_collect_writes_once_is_idempotent_and_keeps_the_first_outputs(
        tmp_path: Path, write_experiment: Any, returns: Returns) -> None:
    first, second = _runs(write_experiment, "ret_unit")
    layout = Layout(tmp_path / "root")
    assert _return(first, returns, tmp_path)["status"] == "DONE"
    assert (returns.record(first) or {}).get("status") == "DONE"
    assert not (tmp_path / "worker-root").exists() and list((tmp_path / "scratch").iterdir()) == []
    notes = collect(layout, [first, second], returns, KIB64)
    assert notes == [f"{first.name}: wrote its returned outputs "
                     f"({sum(p.stat().st_size for p in layout.fold_files(first).values())} bytes)"]
    assert fold_is_done(layout, first) and not fold_is_done(layout, second)
    written = _tree(layout.root)
    assert collect(layout, [first, second], returns, KIB64) == [] and _tree(layout.root) == written

    # A late second attempt of the first fold (other bytes: its timing) and the second fold.
    _return(first, returns, tmp_path, attempt=2)
    _return(second, returns, tmp_path)
    notes = collect(layout, [first, second], returns, KIB64)
    assert f"{first.name}: dropped a late archive that differs from the fold already written (kept the first)" in notes
    assert all(_tree(layout.root)[k] == v for k, v in written.items() if "fold_0" in k)
    assert fold_is_done(layout, second) and _waiting(returns, [first, second]) == []
    finalize_group(layout, [first, second])
    final = _tree(layout.root)
    finalize_group(layout, [first, second])  # a second finalize changes nothing
    assert collect(layout, [first, second], returns, KIB64) == [] and _tree(layout.root) == final


def _waiting(returns: Returns, specs: list[RunSpec]) -> list[str]:
    return [k for k, v in returns.records(specs).items() if v["returned"]]


@pytest.mark.parametrize(("name", "why"), [
    ("../escape.csv", "names a file '../escape.csv' that is not a plain file name"),
    ("/tmp/abs.csv", "names a file '/tmp/abs.csv' that is not a plain file name"),
    ("other.csv", "unexpected files ['other.csv']"),
])
def test_a_tampered_archive_fails_its_fold_and_writes_nothing(
        tmp_path: Path, write_experiment: Any, returns: Returns, name: str, why: str) -> None:
    import base64
    import hashlib
    import zlib

    spec = _runs(write_experiment, "ret_tamper")[0]
    content = {n: "x\n" for n in FOLD_FILES[:-1]} | {name: "x\n"}
    blob = zlib.compress(json.dumps(content).encode())
    forged = {"format": transfer.FORMAT, "files": {k: 2 for k in content}, "bytes": len(blob),
              "sha256": hashlib.sha256(blob).hexdigest(), "data": base64.b64encode(blob).decode()}
    assert returns.put(spec, forged, None) == 1
    layout = Layout(tmp_path / "root")
    (note,) = collect(layout, [spec], returns, KIB64)
    record = json.loads(layout.fold_status(spec).read_text())
    assert record["status"] == "FAILED" and "outputs returned by its worker were refused" in record["error"]
    assert why in record["error"]
    assert "FAILED" in note and not layout.fold_dir(spec).exists() and _waiting(returns, [spec]) == []
    assert not (tmp_path / "escape.csv").exists() and not Path("/tmp/abs.csv").exists()
    assert list(layout.group_dir(spec).glob(".staging/*")) == []


def test_only_the_lease_holder_returns_and_the_first_archive_wins(
        tmp_path: Path, write_experiment: Any, returns: Returns) -> None:
    from orchestrator import keys
    from orchestrator.errors import RunStopped

    spec = _runs(write_experiment, "ret_fence")[0]
    returns.client.set(keys.lease(spec.run_key), "holder", ex=60)
    archive = {"format": transfer.FORMAT}
    assert returns.put(spec, archive, "zombie") == 0 and _waiting(returns, [spec]) == []
    assert returns.put(spec, archive, "holder") == 1
    assert returns.put(spec, {**archive, "other": 1}, "holder") == 2
    assert json.loads(returns.payload(spec) or b"{}") == archive

    class Zombie:
        tag = token = "zombie"

    staging = tmp_path / "staging"
    staging.mkdir()
    for n in FOLD_FILES:
        (staging / n).write_text("x\n")
    returns.drop(spec)
    with pytest.raises(RunStopped, match="handed to another attempt"):
        ReturnSink(returns, KIB64).commit(spec, staging, Zombie())
    assert _waiting(returns, [spec]) == []
