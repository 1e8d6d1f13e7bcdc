"""A running cluster (workers started with `orchestrator worker`): submit, status, and
messages that must be refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import errors
from orchestrator.execution.deadletters import DeadLetters
from orchestrator.experiment.spec import RunSpec

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
    from orchestrator.cluster.local import free_port

    cfg = write_experiment("deadbroker", trainer="prior", datasets=["iris"])
    env_url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli("submit", str(cfg), "--broker", env_url, "--results-root", str(tmp_path / "r"), timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "cannot reach the broker" in proc.stderr and "Traceback" not in proc.stderr


def _spec(cluster: Cluster, write_experiment, **changes: object) -> dict:
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand

    cfg = write_experiment("untrusted", trainer="prior", datasets=["iris"], folds=2)
    spec = expand(load_experiments([str(cfg)])[0])[0].to_dict()
    spec.update(changes)
    return spec


@pytest.mark.parametrize(("changes", "error"), [
    ({"dataset": {"name": "secret", "source": "csv", "path": "/etc/secret.csv", "target": "y", "sha256": ""}},
     "InvalidSpecError"),
    ({"holdout": 1e308}, "InvalidSpecError"),
    ({"retries": 10**6}, "InvalidSpecError"),
    ({"params": {"epochs": 10**9}}, "InvalidSpecError"),
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
    assert isinstance(result.result, getattr(errors, error)), (result.result, result.traceback)
    # Nothing was written outside the results root.
    parent = running_cluster.root.parent
    assert not (parent / "escape").exists() and not (parent / "outside").exists()
    # A refused message writes nothing that belongs to a run: no status file, no log.
    assert not (running_cluster.root / "untrusted").exists()
    # Its reason is in the dead letters, with its task id.
    letters = DeadLetters.from_url(running_cluster.url).list(limit=1000)
    mine = [d for d in letters if d.get("task_id") == result.id]
    assert mine, letters[:3]
    refused_as = str(mine[0].get("reason")).split(":")[0]
    assert issubclass(getattr(errors, refused_as), getattr(errors, error)), mine
    if changes.get("trainer"):
        RunSpec.from_dict(spec)  # the spec itself was well-formed


def test_pickle_messages_are_refused(running_cluster: Cluster) -> None:
    app = celery_app(running_cluster.url)
    app.conf.task_serializer = "pickle"
    app.conf.accept_content = ["json", "pickle"]
    app.send_task("tasks.train_run", args=[{"x": 1}], queue="cpu", serializer="pickle")
    wait_for(lambda: any("ContentDisallowed" in running_cluster.log(n) or "disallowed" in running_cluster.log(n)
                         for n in ("cpu1", "cpu2")),
             timeout=60, what="a worker to refuse the pickle message")


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cuda_only_in_the_pool_child_that_trains(running_cluster: Cluster, write_experiment) -> None:
    """Design invariant 5: CUDA is initialised only in the process that trains. A
    training worker's parent imports torch before it forks (so no fresh pool child pays
    for the import on its run) but never loads the CUDA driver library; the control
    worker never loads torch at all."""
    import psutil

    cfg = write_experiment("where_torch", trainer="mlp", datasets=["iris"], folds=2,
                           params={"epochs": 2, "hidden": [8]})
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env())
    assert proc.returncode == 0, proc.stderr
    for name in ("cpu1", "cpu2"):
        parent = psutil.Process(running_cluster.processes[name].pid)
        maps = _maps(parent.pid)
        assert "libtorch" in maps, f"{name}: torch was not imported before the pool forked"
        assert "libcuda.so" not in maps, f"{name}: the CUDA driver library is loaded in the worker's parent"
        children = parent.children()
        assert children, f"{name} has no pool child"
    trained_in = {json.loads(Path(f["files"]["metadata.json"]).read_text())["worker"]
                  for g in json.loads(run_cli("status", "where_torch", "--json",
                                              env=running_cluster.env()).stdout)["group_details"]
                  for f in g["folds"]}
    for worker in trained_in:
        name = worker.split("@")[0]
        (child,) = psutil.Process(running_cluster.processes[name].pid).children()
        assert "libtorch" in _maps(child.pid), f"{name}: the pool child that trained has no torch"
    control = running_cluster.processes["control"].pid
    assert all("libtorch" not in _maps(p.pid) for p in [psutil.Process(control), *psutil.Process(control).children()])


def test_timeout_fails_the_run_with_a_clear_error(running_cluster: Cluster, write_experiment) -> None:
    cfg = write_experiment("too_slow", trainer="slow", datasets=["iris"], folds=2, timeout=1,
                           params={"seconds": 60}, resources={"gpus": 0})
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    status = json.loads(run_cli("status", "too_slow", "--json", env=running_cluster.env()).stdout)
    assert status["groups"] == {"FAILED": 1}
    for fold in status["group_details"][0]["folds"]:
        assert fold["state"] == "FAILED"
        assert "exceeded its timeout of 1 s" in fold["error"]
        assert fold["elapsed"] is None or fold["elapsed"] < 30


def _blobs_csv(path: Path, rows: int = 90) -> Path:
    import random

    rnd = random.Random(0)
    lines = ["a,b,label"]
    for i in range(rows):
        c = i % 3
        lines.append(f"{c * 3 + rnd.gauss(0, 1):.3f},{c * -2 + rnd.gauss(0, 1):.3f},cls{c}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_dataset_with_single_split_and_random_sweep(running_cluster: Cluster, write_experiment,
                                                        tmp_path: Path) -> None:
    _blobs_csv(tmp_path / "blobs.csv")
    cfg = write_experiment("csv_split", trainer="mlp", datasets=[{"csv": "blobs.csv", "target": "label"}],
                           split={"validation": 0.3}, holdout=0.2, seeds=[3],
                           params={"epochs": 30, "hidden": [16]}, resources={"gpus": 0},
                           sweep={"random": {"samples": 3, "seed": 1, "space": {"lr": {"loguniform": [0.003, 0.03]}}}})
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env())
    assert proc.returncode == 0, proc.stderr
    status = json.loads(run_cli("status", "csv_split", "--json", env=running_cluster.env()).stdout)
    assert status["groups"] == {"DONE": 3} and status["runs"] == {"DONE": 3}
    for group in status["group_details"]:
        assert group["name"].startswith("csv_split/blobs/lr=") and len(group["folds"]) == 1
        meta = json.loads(Path(group["folds"][0]["files"]["metadata.json"]).read_text())
        assert meta["classes"] == ["cls0", "cls1", "cls2"]
        assert meta["n_holdout"] == 18 and meta["n_val"] + meta["n_train"] == 72
        assert meta["spec"]["dataset"]["source"] == "csv" and len(meta["spec"]["dataset"]["sha256"]) == 64
        assert group["metrics"]["oof"]["accuracy"] > 0.8


def test_single_split_failure_reaches_the_error_callback(running_cluster: Cluster, write_experiment) -> None:
    cfg = write_experiment("split_fail", trainer="flaky", datasets=["iris"], split={"validation": 0.3},
                           params={"fail_fold": 0}, resources={"gpus": 0})
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    status = json.loads(run_cli("status", "split_fail", "--json", env=running_cluster.env()).stdout)
    (group,) = status["group_details"]
    assert group["state"] == "FAILED" and "deliberate failure on fold 0" in group["failed"]["0"]


def test_a_csv_changed_after_submission_fails_clearly(running_cluster: Cluster, write_experiment,
                                                      tmp_path: Path) -> None:
    """The run id covers the CSV's content: a worker refuses a file that changed since."""
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand

    csv_path = _blobs_csv(tmp_path / "drift.csv")
    cfg = write_experiment("drift", trainer="prior", datasets=[{"csv": "drift.csv", "target": "label"}],
                           folds=2, resources={"gpus": 0})
    spec = expand(load_experiments([str(cfg)])[0])[0]
    csv_path.write_text(csv_path.read_text().replace("cls2", "cls9"))
    app = celery_app(running_cluster.url)
    result = app.send_task("tasks.train_run", args=[spec.to_dict()], queue="cpu")
    wait_for(lambda: result.state == "FAILURE", timeout=60, what="the run to fail")
    assert "changed since the experiment was submitted" in str(result.result)


def test_identical_csv_files_under_two_names_are_two_datasets(running_cluster: Cluster, write_experiment,
                                                              tmp_path: Path) -> None:
    _blobs_csv(tmp_path / "one.csv")
    (tmp_path / "two.csv").write_bytes((tmp_path / "one.csv").read_bytes())
    cfg = write_experiment("twins", trainer="prior", folds=2, resources={"gpus": 0},
                           datasets=[{"name": "a", "csv": "one.csv", "target": "label"},
                                     {"name": "b", "csv": "two.csv", "target": "label"}])
    assert run_cli("submit", str(cfg), "--wait", env=running_cluster.env()).returncode == 0
    status = json.loads(run_cli("status", "twins", "--json", env=running_cluster.env()).stdout)
    assert sorted(g["name"] for g in status["group_details"]) == ["twins/a/base/seed=0", "twins/b/base/seed=0"]
    assert status["groups"] == {"DONE": 2} and status["runs"] == {"DONE": 4}
    again = run_cli("submit", str(cfg), "--wait", env=running_cluster.env())
    assert again.returncode == 0 and "0 runs in 0 groups" in again.stderr


def test_a_failing_finalize_fails_the_group_with_its_reason(running_cluster: Cluster, write_experiment) -> None:
    cfg = write_experiment("badfinal", trainer="prior", datasets=["iris"], folds=2, resources={"gpus": 0})
    assert run_cli("submit", str(cfg), "--wait", env=running_cluster.env()).returncode == 0
    group = running_cluster.root / "badfinal/iris/base/seed=0"
    probs = group / "fold_0/probabilities.csv"
    probs.write_text("x" * len(probs.read_text()))  # same size: the fold still looks DONE
    (group / "status/status.json").unlink()
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env(), timeout=120)
    assert proc.returncode == 1, proc.stderr  # and no hang: the group reached a final state
    assert "badfinal/iris/base/seed=0/finalize" in proc.stderr
    record = json.loads((group / "status/status.json").read_text())
    assert record["train_status"] == "FAILED" and "finalize" in record["failed"]


def test_a_truncated_output_makes_its_run_run_again(running_cluster: Cluster, write_experiment) -> None:
    cfg = write_experiment("truncated", trainer="prior", datasets=["iris"], folds=2, resources={"gpus": 0})
    assert run_cli("submit", str(cfg), "--wait", env=running_cluster.env()).returncode == 0
    fold = running_cluster.root / "truncated/iris/base/seed=0/fold_1"
    (fold / "ranks.csv").write_text("")  # what a host crash before writeback can leave
    plan = json.loads(run_cli("plan", str(cfg), "--json", env=running_cluster.env()).stdout)
    assert plan[0]["totals"]["to_run"] == 1
    assert run_cli("submit", str(cfg), "--wait", env=running_cluster.env()).returncode == 0
    assert (fold / "ranks.csv").stat().st_size > 0


def test_a_run_that_always_kills_its_process_is_retried_then_fails(running_cluster: Cluster, write_experiment) -> None:
    """Poison run: each attempt SIGKILLs its pool process. It is retried (a lost attempt
    is not the run's fault) but not forever: 1 + max(retries, 2) attempts, then FAILED."""
    cfg = write_experiment("killed", trainer="killed", datasets=["iris"], folds=3,
                           params={"kill_fold": 1}, resources={"gpus": 0})
    proc = run_cli("submit", str(cfg), "--wait", env=running_cluster.env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    status = json.loads(run_cli("status", "killed", "--json", env=running_cluster.env()).stdout)
    folds = {f["fold"]: f for f in status["group_details"][0]["folds"]}
    assert folds[1]["state"] == "FAILED", folds[1]
    assert "died 3 times" in folds[1]["error"] and folds[1]["attempt"] == 4, folds[1]
    record = json.loads((running_cluster.root / "killed/iris/base/seed=0/status/fold_1.json").read_text())
    assert [h["outcome"] for h in record["history"]] == ["LOST", "LOST", "LOST", "FAILED"]
    assert folds[0]["state"] == folds[2]["state"] == "DONE"
    # The worker replaced its pool process and goes on working.
    cfg2 = write_experiment("after_kill", trainer="prior", datasets=["iris"], folds=2, resources={"gpus": 0})
    assert run_cli("submit", str(cfg2), "--wait", env=running_cluster.env()).returncode == 0


def test_submit_to_an_unreachable_broker_writes_nothing(tmp_path: Path, write_experiment) -> None:
    from orchestrator.cluster.local import free_port

    cfg = write_experiment("nowrite", trainer="prior", datasets=["iris"])
    root = tmp_path / "r"
    proc = run_cli("submit", str(cfg), "--broker", f"redis://127.0.0.1:{free_port()}/0",
                   "--results-root", str(root), timeout=120)
    assert proc.returncode == 3
    assert [p for p in root.rglob("*")] == []


@pytest.mark.parametrize(("args", "env", "code", "message"), [
    (["--broker", "redis://:bad"], {}, 2, "is not a usable Redis URL"),
    (["--broker", "http://x"], {}, 2, "must start with redis://"),
    (["--broker", "redis://127.0.0.1:6379/x"], {}, 2, "must be a number"),
    (["--broker", "redis://127.0.0.1:1/0", "--results-root", "/proc/forbidden"], {}, 3, "is not a writable folder"),
    (["--broker", "redis://127.0.0.1:1/0"], {"ORCH_VISIBILITY_TIMEOUT": "12h"}, 2, "ORCH_VISIBILITY_TIMEOUT='12h' is not valid"),
])
def test_bad_settings_are_clear_errors(write_experiment, tmp_path: Path, args: list[str],
                                       env: dict[str, str], code: int, message: str) -> None:
    from .conftest import cli_env

    cfg = write_experiment("settings", trainer="prior", datasets=["iris"])
    if "--results-root" not in args:
        args = [*args, "--results-root", str(tmp_path / "r")]
    proc = run_cli("submit", str(cfg), *args, env=cli_env(**env), timeout=120)
    assert proc.returncode == code, proc.stderr
    assert message in " ".join(proc.stderr.split())


def test_celery_url_spells_a_unix_socket_as_kombu_does() -> None:
    from orchestrator.keys import celery_url

    assert celery_url("unix:///run/redis/r.sock") == "redis+socket:///run/redis/r.sock"
    assert celery_url("unix:///run/r.sock?db=2") == "redis+socket:///run/r.sock?virtual_host=2"
    for url in ("redis://h:6379/0", "rediss://h:6380/1?ssl_cert_reqs=required"):
        assert celery_url(url) == url


def test_a_cluster_on_a_unix_socket_runs_an_experiment(tmp_path: Path, write_experiment) -> None:
    """ORCH_BROKER_URL=unix:///path (what redis-py reads) reaches workers, submit and
    status: kombu and Celery's backend get redis+socket://, without the TCP-only
    keepalive option (both broke with a traceback before)."""
    import os
    import shutil
    import subprocess
    import sys

    from orchestrator.cluster.local import spawn, stop_process

    from .conftest import cli_env

    sock = tmp_path / "redis.sock"
    redis_proc = spawn([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
                        "--dir", str(tmp_path), "--save", "", "--appendonly", "no"], dict(os.environ),
                       tmp_path / "redis.out")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(sock.exists, timeout=20, what="redis-server's socket")
        env = cli_env(ORCH_BROKER_URL=f"unix://{sock}", ORCH_RESULTS_ROOT=str(tmp_path / "results"))
        for role, name in (("--cpu", "uxcpu@%h"), ("--control", "uxctl@%h")):
            workers.append(spawn([sys.executable, "-m", "orchestrator", "worker", role, "--name", name],
                                 env, tmp_path / f"{role[2:]}.log"))
        cfg = write_experiment("unix_sock", trainer="prior", datasets=["iris"], folds=2, resources={"gpus": 0})
        proc = run_cli("submit", str(cfg), "--wait", env=env, timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        status = json.loads(run_cli("status", "unix_sock", "--json", env=env).stdout)
        assert status["groups"] == {"DONE": 1} and status["runs"] == {"DONE": 2}, status
    finally:
        for p in [*workers, redis_proc]:
            stop_process(p)
