"""A running cluster (workers started with `orchestrator worker`): submit, status, and
messages that must be refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.spec import RunSpec

from .conftest import Cluster, celery_app, run_cli, wait_for

pytestmark = pytest.mark.integration


def test_submit_wait_on_running_cluster(running_cluster: Cluster, write_experiment) -> None:
    cfg = write_experiment("cluster_sub", trainer="pid", datasets=["wine"], folds=3, seeds=[1, 2],
                           resources={"gpus": 0})
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "cluster_sub"  # the experiment id, for scripts
    status = json.loads(run_cli("status", "cluster_sub", "--json", env=running_cluster.env()).stdout)
    assert status["runs"] == {"DONE": 6} and status["groups"] == {"DONE": 2}
    workers = set()
    for group in status["group_details"]:
        for fold in group["folds"]:
            meta = json.loads(Path(fold["files"]["metadata.json"]).read_text())
            workers.add(meta["worker"])
            assert meta["trainer_info"]["pid"] > 0
    assert workers and all(w.split("@")[0] in ("cpu1", "cpu2") for w in workers), workers
    # Submitting again enqueues nothing: every run is DONE.
    again = run_cli("submit", str(cfg), env=running_cluster.env())
    assert again.returncode == 0 and "0 runs in 0 groups" in again.stderr


def test_submit_without_broker_is_a_clear_error(write_experiment) -> None:
    cfg = write_experiment("nobroker", trainer="prior", datasets=["iris"])
    proc = run_cli("submit", str(cfg))
    assert proc.returncode == 2 and "no broker configured" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_broker_is_a_clear_error(tmp_path: Path, write_experiment) -> None:
    from orchestrator.local import free_port

    cfg = write_experiment("deadbroker", trainer="prior", datasets=["iris"])
    env_url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli("submit", str(cfg), "--broker", env_url, "--results-root", str(tmp_path / "r"), timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "cannot reach the broker" in proc.stderr and "Traceback" not in proc.stderr


def _spec(cluster: Cluster, write_experiment, **changes: object) -> dict:
    from orchestrator.config import load_experiments
    from orchestrator.expand import expand

    cfg = write_experiment("untrusted", trainer="prior", datasets=["iris"], folds=2)
    spec = expand(load_experiments([str(cfg)])[0])[0].to_dict()
    spec.update(changes)
    return spec


@pytest.mark.parametrize(("changes", "error"), [
    ({"experiment": "../../escape"}, "InvalidSpecError"),
    ({"output": "../outside"}, "InvalidSpecError"),
    ({"trainer": "os.system"}, "UnknownTrainerError"),
    ({"unexpected": 1}, "InvalidSpecError"),
])
def test_untrusted_train_messages_are_refused(running_cluster: Cluster, write_experiment,
                                              changes: dict, error: str) -> None:
    app = celery_app(running_cluster.url)
    spec = _spec(running_cluster, write_experiment, **changes)
    result = app.send_task("tasks.train_run", args=[spec], queue="cpu")
    wait_for(lambda: result.state == "FAILURE", timeout=60, what="the message to be refused")
    assert error in repr(result.result) or error in (result.traceback or "")
    # Nothing was written outside the results root.
    parent = running_cluster.root.parent
    assert not (parent / "escape").exists() and not (parent / "outside").exists()
    if changes.get("trainer"):
        # a valid spec naming an unregistered trainer: its fold is marked FAILED, and why
        rec = json.loads((running_cluster.root / "untrusted/iris/base/seed=0/status/fold_0.json").read_text())
        assert rec["status"] == "FAILED" and "not registered" in rec["error"]
        RunSpec.from_dict(spec)  # the spec itself was well-formed


def test_pickle_messages_are_refused(running_cluster: Cluster) -> None:
    app = celery_app(running_cluster.url)
    app.conf.task_serializer = "pickle"
    app.conf.accept_content = ["json", "pickle"]
    app.send_task("tasks.train_run", args=[{"x": 1}], queue="cpu", serializer="pickle")
    wait_for(lambda: any("ContentDisallowed" in running_cluster.log(n) or "disallowed" in running_cluster.log(n)
                         for n in ("cpu1", "cpu2")),
             timeout=60, what="a worker to refuse the pickle message")
