"""The Python API (`import orchestrator as orch`, docs/api.md) against real Redis and real
workers: a notebook-style script on `orch.local()`, an outside random search whose
process is killed half-way and whose runs a new client collects, a function trainer
registered through ORCH_TRAINER_MODULES, and the errors of bad dict configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

import orchestrator as orch
from orchestrator import keys
from orchestrator.cluster.local import stop_process
from orchestrator.views.progress import NotebookLine

from .conftest import REPO, Cluster, cli_env, wait_for

pytestmark = pytest.mark.integration


def _python(script: str, *args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_a_bad_dict_config_raises_one_error_naming_each_key(tmp_path: Path) -> None:
    client = orch.Client(results_root=tmp_path)  # no broker: validation needs none
    bad = {"experiment": "bad name", "trainer": "prior", "datasets": ["iris", "wnie"], "seed": [1],
           "params": {"smoothin": 1.0}, "folds": 1, "sweep": {"grid": {"smoothing": [-1.0]}}}
    with pytest.raises(orch.ConfigError) as caught:
        client.validate(bad)
    found = {p.key: p.message for p in caught.value.problems}
    assert set(found) == {"experiment", "datasets[1]", "seed", "params.smoothin", "folds",
                          "sweep.grid.smoothing"}, found
    assert all(p.file == "<dict>" for p in caught.value.problems)
    assert "did you mean 'seeds'" in found["seed"] and "did you mean 'wine'" in found["datasets[1]"]
    assert "did you mean 'smoothing'" in found["params.smoothin"]
    assert "must be >= 0.0, got -1.0" in found["sweep.grid.smoothing"]
    # The CLI's class and message: `orchestrator validate` prints exactly this text.
    assert str(caught.value).startswith("6 problems in the configuration:\n  - <dict>: ")
    assert isinstance(caught.value, orch.OrchestratorError) and caught.value.exit_code == 2

    # An evaluation's params: every bad one of every point, before any broker is needed.
    with pytest.raises(orch.ConfigError) as caught:
        client.map("prior", [{"smoothing": 1.0}, {"smoothing": "x", "depth": 3}], "iris")
    problems = caught.value.problems
    assert [p.key for p in problems] == ["points[1].smoothing", "points[1].depth"]
    assert problems[0].message == "must be a number >= 0.0, got 'x'"
    assert problems[1].message.startswith("unknown parameter 'depth' for trainer 'prior'; valid: smoothing")
    with pytest.raises(orch.ConfigError) as caught:
        client.evaluate("no_such_trainer", {}, "iris")
    assert [p.key for p in caught.value.problems] == ["trainer"]
    assert "is not registered (registered: " in caught.value.problems[0].message
    # Good configs: validate and plan answer as the CLI's commands do.
    good = {"experiment": "ok", "trainer": "prior", "datasets": ["iris"], "folds": 3}
    assert client.validate([good, REPO / "configs" / "iris_kfold.yaml"]) == [
        orch.Checked("ok", "<dict>", 3, 1),
        orch.Checked("iris_kfold", str(REPO / "configs" / "iris_kfold.yaml"), 10, 2)]
    (plan,) = client.plan(good)
    assert plan.totals == {"runs": 3, "done": 0, "to_run": 3, "groups": 1, "groups_to_finalize": 1}
    assert [r["state"] for r in plan.runs] == ["NEW"] * 3 and not plan.paused
    with pytest.raises(orch.OrchestratorError, match="no broker configured"):
        client.submit(good)


def test_notebook_style_script_on_a_local_cluster_with_a_function_trainer(tmp_path: Path) -> None:
    """orch.local() starts Redis and workers and stops them; a dict config is submitted,
    waited on and read as records; a trainer declared with @orch.trainer in the module
    that ORCH_TRAINER_MODULES names runs on a worker."""
    env = cli_env(ORCH_TRAINER_MODULES="tests.api_trainers")
    proc = _python("api_notebook.py", str(tmp_path / "results"), env=env)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == {"runs": {"DONE": 6}, "groups": {"DONE": 2}}
    rows = out["results"]
    assert len(rows) == 6 and {r["param.smoothing"] for r in rows} == {0.5, 2.0}
    assert all(isinstance(r["accuracy"], float) and r["fold"] in (0, 1, 2) and r["attempt"] == 1 for r in rows)
    assert out["best"][0]["params"]["smoothing"] in (0.5, 2.0)
    files = out["files"]
    assert files["final_results"] == str(tmp_path / "results" / "nb" / "final_results.csv")
    group = files["groups"]["nb/iris/smoothing=0.5/seed=0"]
    assert sorted(group["folds"]["0"]["files"]) == ["metadata.json", "predictions.csv",
                                                    "probabilities.csv", "ranks.csv"]
    assert all(Path(p).is_file() for f in group["folds"].values() for p in f["files"].values())
    assert out["experiments"] == ["nb"]
    fn = out["function"]
    assert fn["state"] == "DONE" and 0.8 < fn["accuracy"] <= 1.0, fn  # centroids do learn iris
    meta = json.loads((Path(fn["dir"]) / "fold_0" / "metadata.json").read_text())
    assert meta["spec"]["trainer"] == "centroid_fn" and meta["spec"]["params"] == {"temperature": 0.5}
    dp = out["ranks"]
    meta = json.loads((Path(dp["dir"]) / "fold_0" / "metadata.json").read_text())
    assert dp["state"] == "DONE" and meta["spec"]["resources"]["ranks"] == 2, meta
    info = meta.get("trainer_info", {})
    assert (info.get("ranks"), info.get("backend")) == (2, "gloo"), meta
    assert out["processes"] == ["redis", "workers"]  # the workers: forked by one server (cluster.forkserver)
    assert out["stopped"] is True and out["redis_after"] == "gone"


def test_a_search_block_submitted_as_a_dict_is_waited_on_and_its_best_trials_read(tmp_path: Path) -> None:
    """An evolution search (4 + 3 trials of the cheap objective) through the API on
    orch.local(), as `orchestrator submit --wait` runs it: best(3) is what `search best
    --json` lists, and agrees with the journal and each trial's group status.json."""
    from orchestrator.paths import Layout, read_json
    from orchestrator.search.client import best_report
    from orchestrator.search.engine import metric_value, read_history

    root = tmp_path / "results"
    proc = _python("api_search_block.py", str(root), env=cli_env(), timeout=150)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["is_search"] is True and out["early"] == 7 and out["done"] is True
    search = out["status"]["search"]
    assert search["strategy"] == "evolution" and search["finished"] is True and search["stopped"] is None
    assert (search["trials"], search["complete"], search["failed"], search["generation"]) == (7, 7, 0, 1)
    assert set(out["status"]["groups"]) == {"DONE"}  # the trials' groups (a repeated point reuses one)
    journal = read_history(Layout(root), "evo_py").ordered
    assert [t.state for t in journal] == ["COMPLETE"] * 7
    by_number = {t.number: t for t in journal}
    best = out["best"]
    expected = sorted(journal, key=lambda t: (-(t.values or [0.0])[0], t.number))[:3]
    assert [t["number"] for t in best] == [t.number for t in expected]
    assert [t["score"] for t in best] == [t.values[0] for t in expected if t.values]
    assert best[0]["number"] == search["best"]["number"]
    for trial in best:
        assert trial["state"] == "COMPLETE" and trial["params"] == by_number[trial["number"]].params
        assert trial["values"] == {"reported.score": trial["score"]}
        (group,) = trial["groups"]  # one dataset, one seed
        record = read_json(Path(group["status.json"]))
        assert record["train_status"] == "DONE"
        assert metric_value(record, "reported.score") == pytest.approx(trial["score"])
    assert out["metric_refused"] is True
    # Client.plan before the submit: the search and the proposals its first step made.
    planned = out["plan"]["search"]
    assert out["plan"]["totals"] == {} and planned["search"]["strategy"] == "evolution"
    assert planned["progress"]["proposed"] == 0 and planned["runs_per_trial"] == 1
    assert [(n["number"], n["params"]) for n in planned["next"]] == [(t.number, t.params) for t in journal[:4]]
    # What `orchestrator search best --json` prints; submitted again: ended, the same.
    assert best_report(Layout(root), "evo_py", 3)["trials"] == best == out["again_best"]
    assert out["again"]["finished"] is True and out["again"]["proposed"] == 7
    assert out["experiments"] == ["evo_py"] and out["optuna"] is False


def test_a_worker_stops_at_its_start_when_a_trainer_module_cannot_be_imported(running_cluster: Cluster,
                                                                              tmp_path: Path) -> None:
    env = running_cluster.env(ORCH_TRAINER_MODULES="tests.plugins,tests.no_such_module")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "worker", "--cpu", "--name", "broken@%h"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot import trainer module 'tests.no_such_module': ModuleNotFoundError" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A plain `celery -A tasks worker` stops at its start too (worker_init), saying why.
    log = tmp_path / "celery.log"
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "nothing", "-c", "1",
            "-n", "broken2@%h", "--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    with open(log, "wb") as fh:
        worker = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        assert worker.wait(timeout=60) == 2
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "cannot import trainer module 'tests.no_such_module'" in log.read_text()
    # A worker of the control queue alone never trains: it starts all the same.
    from .conftest import celery_app

    argv[argv.index("nothing")], argv[argv.index("broken2@%h")] = "control", "ctl-broken@%h"
    with open(tmp_path / "control.log", "wb") as fh:
        control = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        app = celery_app(running_cluster.url)
        wait_for(lambda: app.control.ping(destination=[f"ctl-broken@{os.uname().nodename}"], timeout=0.5),
                 timeout=60, what="the control-only worker to answer")
    finally:
        stop_process(control)  # type: ignore[arg-type]


def test_an_outside_search_killed_half_way_is_collected_by_a_new_client(running_cluster: Cluster) -> None:
    """20 evaluations through evaluate/as_completed; the caller is SIGKILLed after 10
    results; a new process asks the same 20 points and gets all 20 results, and no
    run was trained twice (one attempt, one log, one finalize each)."""
    env = running_cluster.env()
    args = [sys.executable, str(REPO / "tests" / "api_search.py"), running_cluster.url, str(running_cluster.root)]
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    told = []
    try:
        assert first.stdout is not None
        deadline = time.monotonic() + 120
        while len(told) < 10 and time.monotonic() < deadline:
            line = first.stdout.readline()
            if not line:
                break
            if line.startswith("told "):
                told.append(line.split())
        assert len(told) == 10, first.stderr.read() if first.stderr else ""
        os.killpg(first.pid, signal.SIGKILL)  # the caller dies with evaluations in flight
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            stop_process(first)  # type: ignore[arg-type]
    second = _python("api_search.py", running_cluster.url, str(running_cluster.root), env=env)
    lines = second.stdout.strip().splitlines()
    assert json.loads(lines[-1])["told"] == 20
    ids = {line.split()[2] for line in lines if line.startswith("told ")}
    assert len(ids) == 20 and {t[2] for t in told} <= ids

    client = orch.Client(running_cluster.url, results_root=running_cluster.root)
    futures = client.futures("search")
    assert {f.id for f in futures} == ids
    r = redis.Redis.from_url(running_cluster.url)
    for future in futures:
        result = future.result(timeout=5)
        assert result.metrics["accuracy"] == pytest.approx(float(next(
            line.split()[3] for line in lines if line.startswith("told ") and line.split()[2] == future.id)))
        (spec,) = future.specs  # one split: one run per evaluation
        record = json.loads(client.layout.fold_status(spec).read_text())
        assert record["status"] == "DONE" and record["attempt"] == 1, record
        assert len(record.get("history", [])) == 1, record
        assert [p.name for p in client.layout.logs_dir(spec).iterdir()] == ["fold_0.attempt_1.log"]
        assert int(r.get(keys.group_finalized("search", future.id)) or 0) == 1
        # Found again by id, from the manifest alone.
        assert client.future(future.id).run_ids == future.run_ids
    # The evaluations are ordinary runs of an ordinary experiment: `status` sees them.
    status = client.experiment("search").status()
    assert status["runs"] == {"DONE": 20} and status["groups"] == {"DONE": 20}


def test_evaluation_futures_fail_cancel_and_deduplicate(running_cluster: Cluster,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import trainers

    monkeypatch.setenv("ORCH_TRAINER_MODULES", "tests.plugins")  # as the workers have it
    monkeypatch.setattr(trainers, "_REGISTRY", None)
    client = orch.Client(running_cluster.url, results_root=running_cluster.root)
    bad = client.evaluate("flaky", {"fail_fold": 0}, "iris", experiment="futures", resources={"gpus": 0})
    with pytest.raises(orch.EvaluationError) as caught:
        bad.result(timeout=60)
    assert caught.value.state == "FAILED" and "deliberate failure on fold 0" in caught.value.errors["0"]
    # Many in one submission; the same point twice is one future; a queued one cancels.
    futures = client.map("slow", [{"seconds": 2.0, "smoothing": s} for s in (1.0, 2.0, 3.0, 4.0, 1)],
                         "iris", experiment="futures", resources={"gpus": 0})  # 1 and 1.0: one point
    assert futures[0] == futures[4] and len({f.id for f in futures}) == 4
    last = futures[3]
    assert last.cancel() is True and last.state() == "CANCELLED"  # 2 workers: the 4th waits
    with pytest.raises(orch.EvaluationError, match="ended CANCELLED"):
        last.result(timeout=10)
    done = list(orch.as_completed(futures[:3], timeout=60))
    assert {f.id for f in done} == {f.id for f in futures[:3]}
    assert all(f.result().accuracy > 0 for f in done)
    again = client.evaluate("slow", {"smoothing": 1.0, "seconds": 2.0}, "iris", experiment="futures",
                            resources={"gpus": 0})
    assert again.id == futures[0].id and again.done()  # DONE: not trained again
    with pytest.raises(TimeoutError):
        client.evaluate("slow", {"seconds": 5.0}, "iris", experiment="futures",
                        resources={"gpus": 0}).result(timeout=0.5)
    wait_for(lambda: client.experiment("futures").done(), timeout=60, what="the last evaluation")


def test_results_are_records_with_python_values_and_a_dataframe_with_pandas(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster: the rows of final_results.csv as records; pandas only when asked for."""
    import types

    from orchestrator.collect.results import update_final_results
    from orchestrator.paths import Layout

    update_final_results(Layout(tmp_path), "e", [{
        "experiment": "e", "dataset": "iris", "point": "hidden=64-32", "seed": 0, "fold": 1,
        "run_id": "r1", "group_id": "g1", "accuracy": 0.75, "log_loss": None, "macro_f1": 0.5,
        "holdout_accuracy": 1, "seconds": 0.25, "worker": "cpu1@h", "device": "cpu", "attempt": 1,
        "param.hidden": [64, 32], "param.flag": True, "param.act": "relu"}])
    exp = orch.Client(results_root=tmp_path).experiments()  # no manifest: not listed
    assert exp == []
    handle = orch.Experiment(orch.Client(results_root=tmp_path), "e")
    (row,) = handle.results()
    assert row["accuracy"] == 0.75 and row["log_loss"] is None and row["fold"] == 1
    assert row["param.hidden"] == [64, 32] and row["param.flag"] is True and row["param.act"] == "relu"
    monkeypatch.setitem(sys.modules, "pandas", None)  # not installed: a clear ImportError
    with pytest.raises(ImportError, match="needs pandas"):
        handle.dataframe()
    fake = types.ModuleType("pandas")
    fake.DataFrame = types.SimpleNamespace(from_records=lambda rows: ("frame", rows))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert handle.dataframe() == ("frame", [row])


def test_an_experiment_is_paused_resumed_and_cancelled_from_python(running_cluster: Cluster,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import trainers

    monkeypatch.setenv("ORCH_TRAINER_MODULES", "tests.plugins")
    monkeypatch.setattr(trainers, "_REGISTRY", None)
    client = orch.Client(running_cluster.url, results_root=running_cluster.root)
    exp = client.submit({"experiment": "steer_py", "trainer": "slow", "datasets": ["iris"], "folds": 4,
                         "params": {"seconds": 3.0}, "resources": {"gpus": 0}})
    assert exp.pause() == {"handed_back": 0} and exp.paused()
    with pytest.raises(TimeoutError):
        exp.wait(timeout=0.5, progress=False)
    resumed = exp.resume()
    assert not exp.paused() and resumed["unparked"] >= 0
    counts = exp.cancel()
    assert counts["queued"] + counts["running"] == 4, counts
    status = exp.wait(timeout=60, progress=False)
    assert status["groups"] == {"CANCELLED": 1}, status
    assert set(status["runs"]) <= {"CANCELLED", "DONE"} and status["runs"].get("CANCELLED", 0) >= 1
    assert client.experiment("steer_py").done()
    with pytest.raises(orch.ExperimentNotFound):
        client.experiment("no_such_experiment")


def test_wait_in_a_real_notebook_shows_one_progress_line_updated_in_place(tmp_path: Path) -> None:
    """A Jupyter kernel (nbclient, ipykernel) runs a notebook that submits to orch.local()
    and waits with progress=True. Without ipywidgets rich's live bar shows nothing in a
    notebook, so the wait keeps one display output up to date by its display id: at the
    end it holds the whole bar and every run; no warning, no error."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = tmp_path / "results"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import orchestrator as orch"),
        nbformat.v4.new_code_cell(
            f"with orch.local(workers=2, results_root={str(root)!r}) as client:\n"
            "    exp = client.submit({'experiment': 'nbbar', 'trainer': 'slow', 'datasets': ['iris'],\n"
            "                         'folds': 4, 'params': {'seconds': 0.5}, 'resources': {'gpus': 0}})\n"
            "    status = exp.wait(timeout=120)\n"
            "status['runs']"),
    ]
    env = cli_env(ORCH_TRAINER_MODULES="tests.plugins")
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel starts with this process's environment
    updates: list[str] = []

    class Client(nbclient.NotebookClient):  # type: ignore[misc,name-defined]
        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            if msg["msg_type"] == "update_display_data":
                updates.append(msg["content"]["data"]["text/plain"])
            return super().process_message(msg, cell, cell_index)

    try:
        Client(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = nb.cells[1].outputs
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert len(shown) == 1, outputs  # one output, updated in place
    text = shown[0].data["text/plain"]
    assert len(updates) >= 2 and updates[-1] == text, updates  # updated in place as runs ended
    assert text.startswith("training ") and "4/4 runs (4 done, 0 failed, 0 running)" in text, text
    assert "█" * NotebookLine.WIDTH in text, text
    result = [o for o in outputs if o.output_type == "execute_result"]
    assert result and result[0].data["text/plain"] == "{'DONE': 4}", outputs
    assert not [o for o in outputs if o.output_type in ("error", "stream") and "ipywidgets" in str(o)], outputs
