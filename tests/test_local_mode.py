"""`orchestrator run` in local mode: private Redis, real workers, real training."""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.collect.finalize import finalize_group
from orchestrator.dispatch.manifest import load_manifest
from orchestrator.experiment.spec import RunSpec
from orchestrator.paths import Layout

from .conftest import REPO, cli_env, run_cli, wait_for

pytestmark = pytest.mark.integration


def fold_records(root: Path, experiment: str) -> dict[str, dict]:
    """run name -> fold status record, for every run of the experiment."""
    layout = Layout(root)
    out = {}
    for group in load_manifest(layout, experiment)["groups"]:
        for raw in group["runs"]:
            spec = RunSpec.from_dict(raw)
            path = layout.fold_status(spec)
            out[spec.name] = json.loads(path.read_text()) if path.exists() else {}
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_iris_kfold_end_to_end(tmp_path: Path, write_experiment) -> None:
    cfg = write_experiment("iris_e2e", trainer="mlp", datasets=["iris"], folds=5, seeds=[42],
                           params={"hidden": [32], "epochs": 60, "batch_size": 16, "lr": 0.01})
    root = tmp_path / "results"
    proc = run_cli("run", str(cfg), "--results-root", str(root))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "DONE" in proc.stdout

    status = json.loads(run_cli("status", "iris_e2e", "--json", "--results-root", str(root)).stdout)
    assert status["runs"] == {"DONE": 5}
    (group,) = status["group_details"]
    assert group["state"] == "DONE"
    assert group["metrics"]["oof"]["accuracy"] > 0.9
    assert group["metrics"]["ensemble_holdout"]["accuracy"] > 0.9
    for fold in group["folds"]:
        assert fold["state"] == "DONE" and fold["attempt"] == 1 and fold["worker"].startswith("cpu")
        files = {name: Path(p) for name, p in fold["files"].items()}
        assert set(files) == {"predictions.csv", "probabilities.csv", "ranks.csv", "metadata.json"}
        preds, probs, ranks = (read_csv(files[n]) for n in ("predictions.csv", "probabilities.csv", "ranks.csv"))
        meta = json.loads(files["metadata.json"].read_text())
        assert len(preds) == len(probs) == len(ranks) == meta["n_val"] + meta["n_holdout"]
        assert meta["n_val"] + meta["n_holdout"] + meta["n_train"] == 150 and meta["n_holdout"] == 30
        for p, r in zip(probs, ranks, strict=True):
            values = [float(p[c]) for c in meta["classes"]]
            assert abs(sum(values) - 1) < 1e-6
            assert sorted(int(r[c]) for c in meta["classes"]) == [1, 2, 3]
            best = max(meta["classes"], key=lambda c: float(p[c]))
            assert r[best] == "1"
        assert set(meta["metrics"]) == {"accuracy", "log_loss", "macro_f1"}
        assert meta["params_count"] == 4 * 32 + 32 + 32 * 3 + 3
        assert meta["device"] == "cpu" and meta["attempt"] == 1 and meta["training_seconds"] > 0
        assert meta["spec"]["fold"] == fold["fold"] and meta["run_id"] == fold["run_id"]
        assert meta["last_report"]["epoch"] == 60
    for path in group["ensemble_files"].values():
        assert Path(path).stat().st_size > 0
    oof = read_csv(Path(group["ensemble_files"]["oof_predictions.csv"]))
    assert len(oof) == 120 and {r["fold"] for r in oof} == {"0", "1", "2", "3", "4"}
    rows = read_csv(Path(status["final_results"]))
    assert sorted(int(r["fold"]) for r in rows) == [0, 1, 2, 3, 4]
    assert all(float(r["accuracy"]) > 0.75 and r["param.lr"] == "0.01" for r in rows)
    # No temporary file is left anywhere.
    assert not [p for p in root.rglob("*.tmp")]

    # Running it again finds everything DONE and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    again = run_cli("run", str(cfg), "--results-root", str(root))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_failing_fold_marks_group_failed_while_others_finish(tmp_path: Path, write_experiment) -> None:
    cfg = write_experiment("flaky", trainer="flaky", datasets=["iris"], folds=4, retries=1,
                           sweep={"grid": {"fail_fold": [2, -1]}})
    root = tmp_path / "results"
    proc = run_cli("run", str(cfg), "--results-root", str(root))
    assert proc.returncode == 1, proc.stderr
    assert "deliberate failure on fold 2" in proc.stderr

    records = fold_records(root, "flaky")
    bad = "flaky/iris/fail_fold=2/seed=0"
    assert records[f"{bad}/fold=2"]["status"] == "FAILED"
    assert records[f"{bad}/fold=2"]["attempt"] == 2  # retried once, then gave up
    assert "ValueError: deliberate failure on fold 2" in records[f"{bad}/fold=2"]["error"]
    for name, record in records.items():
        if name != f"{bad}/fold=2":
            assert record["status"] == "DONE", name
    layout = Layout(root)
    status_json = json.loads((layout.root / "flaky/iris/fail_fold=2/seed=0/status/status.json").read_text())
    assert status_json["train_status"] == "FAILED"
    assert list(status_json["failed"]) == ["2"] and "deliberate" in status_json["failed"]["2"]
    good = json.loads((layout.root / "flaky/iris/fail_fold=-1/seed=0/status/status.json").read_text())
    assert good["train_status"] == "DONE"
    # The DONE folds of the failed group still have their outputs.
    assert (layout.root / "flaky/iris/fail_fold=2/seed=0/fold_3/metadata.json").exists()
    assert not (layout.root / "flaky/iris/fail_fold=2/seed=0/fold_2/metadata.json").exists()

    # Dropping the failing point: nothing is left to do, and the summary says so.
    cfg = write_experiment("flaky", trainer="flaky", datasets=["iris"], folds=4, retries=1,
                           sweep={"grid": {"fail_fold": [-1]}})
    again = run_cli("run", str(cfg), "--results-root", str(root))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr and "FAILED" not in again.stderr + again.stdout


def test_resume_runs_only_what_is_missing(tmp_path: Path, write_experiment) -> None:
    cfg = write_experiment("resume", trainer="prior", datasets=["iris"], folds=3,
                           sweep={"grid": {"smoothing": [1.0, 2.0, 3.0]}})
    root = tmp_path / "results"
    assert run_cli("run", str(cfg), "--results-root", str(root)).returncode == 0
    first = fold_records(root, "resume")
    base = root / "resume/iris"
    # Group 1: fold 1 never ran. Group 2: its folds ran but finalize did not.
    (base / "smoothing=1/seed=0/status/fold_1.json").unlink()
    for f in (base / "smoothing=1/seed=0/fold_1").iterdir():
        f.unlink()
    (base / "smoothing=2/seed=0/status/status.json").unlink()
    untouched = (base / "smoothing=3/seed=0/status/status.json").stat().st_mtime_ns

    plan = json.loads(run_cli("plan", str(cfg), "--json", "--results-root", str(root)).stdout)
    assert plan[0]["totals"] == {"runs": 9, "done": 8, "to_run": 1, "groups": 3, "groups_to_finalize": 2}

    proc = run_cli("run", str(cfg), "--results-root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "1 runs in 1 groups, 1 groups to finalize" in proc.stderr
    second = fold_records(root, "resume")
    for name, record in second.items():
        assert record["status"] == "DONE"
        if name == "resume/iris/smoothing=1/seed=0/fold=1":
            assert name not in first or record["started_at"] != first[name].get("started_at")
        else:
            assert record["started_at"] == first[name]["started_at"], f"{name} was re-run"
    for point in ("smoothing=1", "smoothing=2"):
        assert json.loads((base / point / "seed=0/status/status.json").read_text())["train_status"] == "DONE"
    assert (base / "smoothing=3/seed=0/status/status.json").stat().st_mtime_ns == untouched
    assert len(read_csv(root / "resume/final_results.csv")) == 9

    # A deleted final_results.csv is rebuilt, without training anything.
    (root / "resume/final_results.csv").unlink()
    plan = json.loads(run_cli("plan", str(cfg), "--json", "--results-root", str(root)).stdout)
    assert plan[0]["totals"]["to_run"] == 0 and plan[0]["totals"]["groups_to_finalize"] == 3
    assert run_cli("run", str(cfg), "--results-root", str(root)).returncode == 0
    assert len(read_csv(root / "resume/final_results.csv")) == 9

    # finalize is idempotent: running it again changes no byte.
    layout = Layout(root)
    group = load_manifest(layout, "resume")["groups"][0]
    specs = [RunSpec.from_dict(r) for r in group["runs"]]
    files = [p for p in (root / "resume").rglob("*") if p.is_file() and not p.name.startswith(".")]
    snapshot = {p: p.read_bytes() for p in files}
    (layout.group_status(specs[0])).unlink()  # force the full finalize path
    finalize_group(layout, specs)
    finalize_group(layout, specs)
    changed = {str(p): "".join(difflib.unified_diff(snapshot[p].decode().splitlines(True),
                                                     p.read_text().splitlines(True)))
               for p in files if p.read_bytes() != snapshot[p] and p.name != "status.json"}
    assert changed == {}


def test_grid_edit_reruns_only_new_points(tmp_path: Path, write_experiment) -> None:
    cfg = write_experiment("grid", trainer="prior", datasets=["iris", "wine"], folds=2,
                           sweep={"grid": {"smoothing": [1.0, 2.0]}})
    root = tmp_path / "results"
    assert run_cli("run", str(cfg), "--results-root", str(root)).returncode == 0
    first = fold_records(root, "grid")
    assert len(first) == 8

    cfg = write_experiment("grid", trainer="prior", datasets=["iris", "wine"], folds=2,
                           sweep={"grid": {"smoothing": [1.0, 2.0, 0.5]}})
    proc = run_cli("run", str(cfg), "--results-root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "submitted grid: 4 runs in 2 groups" in proc.stderr
    second = fold_records(root, "grid")
    assert len(second) == 12
    new = {n for n in second if "smoothing=0.5" in n}
    assert len(new) == 4
    for name in first:
        assert second[name]["started_at"] == first[name]["started_at"], f"{name} was re-run"
        assert second[name]["run_id"] == first[name]["run_id"]
    rows = read_csv(root / "grid/final_results.csv")
    assert len(rows) == 12 and len({r["run_id"] for r in rows}) == 12


def test_ctrl_c_stops_everything_and_a_rerun_finishes(tmp_path: Path, write_experiment) -> None:
    # Runs of 3 s: the SIGINT lands mid-run even on a loaded machine (once the runs end,
    # `run` exits at once and there is nothing left to interrupt).
    cfg = write_experiment("interrupt", trainer="slow", datasets=["iris"], folds=4,
                           params={"seconds": 3.0}, sweep={"grid": {"smoothing": [1.0, 2.0]}})
    root = tmp_path / "results"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # SIGINT at its default in the child whatever this test process inherited (a child
    # that starts with SIGINT ignored never raises KeyboardInterrupt).
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(cfg), "--results-root", str(root)],
                            cwd=REPO, env=cli_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def done_count() -> int:
            try:
                return sum(r.get("status") == "DONE" for r in fold_records(root, "interrupt").values())
            except Exception:
                return 0

        wait_for(lambda: done_count() >= 2, timeout=90, what="two runs to finish")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # redis, 2 workers, control (and their pool children)
        sent_at, done_then = time.monotonic(), done_count()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        stderr += f"\n(test: SIGINT sent {time.monotonic() - sent_at:.1f} s before the exit, {done_then} runs done then)"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
    assert list(tmp.iterdir()) == []  # no orchestrator-local-* folder, no pool's pymp-*
    states = {n: r.get("status") for n, r in fold_records(root, "interrupt").items()}
    assert set(states.values()) <= {"DONE", "CANCELLED"} and "CANCELLED" in states.values()
    first = fold_records(root, "interrupt")

    again = run_cli("run", str(cfg), "--results-root", str(root))
    assert again.returncode == 0, again.stderr
    second = fold_records(root, "interrupt")
    for name, record in first.items():
        assert second[name]["status"] == "DONE"
        if record["status"] == "DONE":
            assert second[name]["started_at"] == record["started_at"], f"{name} was re-run"


def test_missing_redis_server_gives_one_clear_message(tmp_path: Path, write_experiment) -> None:
    cfg = write_experiment("noredis", trainer="prior", datasets=["iris"], folds=2)
    env = cli_env(PATH=os.path.dirname(sys.executable))  # python, but no redis-server
    proc = run_cli("run", str(cfg), "--results-root", str(tmp_path / "r"), env=env)
    assert proc.returncode == 3
    assert "redis-server was not found" in proc.stderr and "apt-get install redis-server" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_local_mode_ignores_state_and_backend_urls_of_another_cluster(tmp_path: Path, write_experiment) -> None:
    from orchestrator.cluster.local import free_port

    cfg = write_experiment("own_redis", trainer="prior", datasets=["iris"], folds=2)
    elsewhere = f"redis://127.0.0.1:{free_port()}/3"  # nothing listens there
    env = cli_env(ORCH_STATE_URL=elsewhere, ORCH_RESULT_BACKEND=elsewhere)
    proc = run_cli("run", str(cfg), "--results-root", str(tmp_path / "r"), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_finished_run_exits_at_once_and_leaves_no_process_and_no_folder(tmp_path: Path, write_experiment) -> None:
    """Every group final: the local workers and Redis are killed at once (nothing is in
    flight, the private Redis goes with them), none is left, nor the working folder."""
    cfg = write_experiment("leftovers", trainer="slow", datasets=["iris"], folds=2, params={"seconds": 0.3})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(cfg), "--results-root",
                             str(tmp_path / "results")], cwd=REPO, env=cli_env(TMPDIR=str(tmp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, psutil.Process] = {}
    try:
        while proc.poll() is None:  # every process the run starts, as long as it runs
            with contextlib.suppress(psutil.Error):
                seen.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "DONE" in stdout
    assert len(seen) >= 4, seen  # redis, 2 workers, control
    _, alive = psutil.wait_procs(list(seen.values()), timeout=5)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
    assert list(tmp.iterdir()) == []  # no orchestrator-local-* folder


def test_a_run_killed_with_sigkill_leaves_no_worker_behind(tmp_path: Path, write_experiment) -> None:
    """`kill -9` of `orchestrator run`: its private Redis and its workers die with it (a
    worker given SIGTERM would wait forever in its cold shutdown on the dead Redis), and
    the fork server, told by its PDEATHSIG, kills its workers and removes the
    orchestrator-local-* folder: within a few seconds nothing is left, running or on disk."""
    cfg = write_experiment("killed9", trainer="slow", datasets=["iris"], folds=4, params={"seconds": 3.0})
    root = tmp_path / "results"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(cfg), "--results-root", str(root)],
                            cwd=REPO, env=cli_env(TMPDIR=str(tmp)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: any(r.get("status") == "IN_PROGRESS" for r in _records_or_none(root, "killed9")),
                 timeout=90, what="a run to be training")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # redis, 2 workers, control (and their pool processes)
        assert any("redis-server" in " ".join(c.cmdline()) for c in children)
        assert len(list(tmp.glob("orchestrator-local-*"))) == 1
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
    wait_for(lambda: list(tmp.iterdir()) == [], timeout=5, what="the orchestrator-local-* folder to go")
    assert time.monotonic() - killed < 15


def test_a_run_killed_while_its_workers_start_leaves_nothing(tmp_path: Path, write_experiment) -> None:
    """`kill -9` of `run` while its fork server still imports (no worker forked yet): the
    server and Redis die, the folder is removed."""
    cfg = write_experiment("killed_early", trainer="prior", datasets=["iris"], folds=2)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(cfg), "--results-root",
                             str(tmp_path / "results")], cwd=REPO, env=cli_env(TMPDIR=str(tmp)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 60
        while not any("forkserver" in " ".join(c.cmdline()) for c in seen.values()):
            assert time.monotonic() < deadline and proc.poll() is None, "no fork server started"
            with contextlib.suppress(psutil.Error):
                seen.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
            time.sleep(0.01)
        assert not (next(tmp.glob("orchestrator-local-*")) / "pids.json").exists()  # none forked yet
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with contextlib.suppress(psutil.Error):
        seen.update({c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)})
    _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
    wait_for(lambda: list(tmp.iterdir()) == [], timeout=5, what="the orchestrator-local-* folder to go")


def _records_or_none(root: Path, experiment: str) -> list[dict]:
    try:
        return list(fold_records(root, experiment).values())
    except Exception:  # no manifest yet
        return []
