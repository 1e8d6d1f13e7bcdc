"""What keeps `submit --wait` cheap: the plan of a new group reads no status file, a
publish reuses one producer and one Redis client, a progress poll reads the runs hash
at most once a second. Each keeps the result it had."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import redis

from orchestrator import keys
from orchestrator.collect.status import Status, write_fold_status
from orchestrator.experiment.plan import RUN, GroupPlan, make_plan
from orchestrator.experiment.spec import DatasetRef, Resources, RunSpec
from orchestrator.livestate import LiveState, status_of
from orchestrator.paths import Layout, atomic_write_json
from orchestrator.views.progress import Poller, Tracked

REPO = Path(__file__).resolve().parents[1]


def spec(point: str, fold: int, k: int = 2) -> RunSpec:
    return RunSpec(experiment="c", trainer="prior", trainer_version="1",
                   dataset=DatasetRef(name="iris", source="sklearn"), params={"p": point}, seed=0,
                   fold=fold, k=k, validation=None, holdout=0.2, output="c/iris", point=point,
                   resources=Resources(gpus=0))


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_status_of_reads_the_start_of_a_value_and_falls_back_to_json() -> None:
    entry = LiveState.run_entry("c", "r", "IN_PROGRESS", worker="w")[2].encode()
    assert status_of(entry) == "IN_PROGRESS"
    assert status_of(json.dumps({"status": "DONE", "t": 1.0}).encode()) == "DONE"
    assert status_of(b'{"t": 1, "status": "FAILED"}') == "FAILED"  # another key order
    assert status_of(b'{"status": "A\\"B"}') == 'A"B'  # an escape: decoded in full
    assert status_of(b'{"t": 1}') is None
    assert status_of(b"not json") is None
    assert status_of(b'{"status": 3}') is None


def test_plan_of_a_new_group_and_of_a_group_with_records(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    runs = [spec("a", 0), spec("a", 1), spec("b", 0), spec("b", 1)]
    fresh = make_plan(layout, runs)
    assert [(len(p.todo), p.action) for p in fresh] == [(2, RUN), (2, RUN)]
    # group b has a status folder: its records are read as before (a FAILED fold runs
    # again; a DONE record whose files are missing is not DONE)
    write_fold_status(layout, runs[2], Status.FAILED, error="boom")
    write_fold_status(layout, runs[3], Status.DONE, files={"predictions.csv": 1})
    again = make_plan(layout, runs)
    assert again == fresh
    atomic_write_json(layout.group_status(runs[0]), {"group_id": "another"})  # folder, no fold record
    assert make_plan(layout, runs) == fresh


def test_a_poll_reads_the_runs_hash_at_most_once_a_second_and_when_all_groups_are_final(
        private_redis: str) -> None:
    live = LiveState.from_url(private_redis)
    runs = [spec("a", 0), spec("a", 1), spec("b", 0), spec("b", 1)]
    plans = [GroupPlan(specs=tuple(runs[:2]), todo=tuple(runs[:2]), action=RUN),
             GroupPlan(specs=tuple(runs[2:]), todo=tuple(runs[2:]), action=RUN)]
    live.set_runs("c", {runs[0].run_id: "PENDING", runs[1].run_id: "PENDING"})  # b: not yet there
    live.client.hset(keys.exp_runs("c"), "someone-else", json.dumps({"status": "DONE"}))  # not tracked
    poller = Poller(live, [Tracked("c", plans)], runs_every=3600)
    before = calls(live.client, "hgetall")
    states, finished, total = poller.poll()
    assert states["PENDING"] == 4 and sum(states.values()) == 4 and (finished, total) == (0, 2)
    live.set_run("c", runs[0].run_id, "IN_PROGRESS", worker="w")
    live.set_run("c", runs[2].run_id, "FAILED")
    live.set_group("c", runs[2].group_id, "FAILED")
    for _ in range(5):
        states, finished, _ = poller.poll()
        assert states["IN_PROGRESS"] == 0 and finished == 1  # runs: the last read; groups: fresh
    assert calls(live.client, "hgetall") - before == 1 + 6  # runs once, groups at every poll
    for r in runs:
        live.set_run("c", r.run_id, "DONE")
    live.set_group("c", runs[0].group_id, "DONE")
    states, finished, total = poller.poll()  # every group final: the runs hash again
    assert states["DONE"] == 4 and sum(states.values()) == 4 and finished == total == 2
    poller.runs_every = 0.0
    live.client.hset(keys.exp_groups("c"), runs[0].group_id, "PENDING")
    live.set_run("c", runs[1].run_id, "IN_PROGRESS")
    states, finished, _ = poller.poll()
    assert states["IN_PROGRESS"] == 1 and finished == 1


PUBLISH = """
import json, sys
from kombu.transport import redis as kombu_redis
from orchestrator.dispatch import canvas
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand
from orchestrator.paths import Layout
from orchestrator.experiment.plan import make_plan

created = []
create = kombu_redis.Channel._create_client
def counting(self, *args, **kwargs):
    created.append(id(self))
    return create(self, *args, **kwargs)
kombu_redis.Channel._create_client = counting
import redis
single, pipelined = [], []
execute = redis.Redis.execute_command
def one(self, *args, **kwargs):
    single.append(str(args[0]).upper())
    return execute(self, *args, **kwargs)
redis.Redis.execute_command = one
run_pipeline = redis.client.Pipeline.execute
def many(self, *args, **kwargs):
    pipelined.append([str(c[0][0]).upper() for c in self.command_stack])
    return run_pipeline(self, *args, **kwargs)
redis.client.Pipeline.execute = many
layout = Layout(sys.argv[2])
plans = make_plan(layout, expand(load_experiments([sys.argv[1]])[0]))
published = canvas.publish(plans, {s.run_id: s.to_dict() for p in plans for s in p.specs})
with canvas.app.producer_or_acquire() as producer:
    left = "producer_or_acquire" in vars(canvas.app) or "conn_or_acquire" in vars(producer.channel)
print(json.dumps({"published": published, "clients": len(created), "left": left,
                  "single": single, "pipelined": pipelined}))
"""


def test_a_publish_uses_one_producer_and_one_client_and_sends_every_chord(
        private_redis: str, tmp_path: Path, write_experiment) -> None:
    config = write_experiment("c", trainer="prior", datasets=["iris"], folds=3, seeds=[0, 1, 2, 3])
    env = {"PYTHONPATH": str(REPO), "ORCH_BROKER_URL": private_redis, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", PUBLISH, str(config), str(tmp_path / "results")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["published"] == {"runs": 12, "groups": 4, "finalize_only": 0}
    # Was two per run: one per LPUSH, one per task-sent PUBLISH. Now one per channel (the
    # publishing connection's, and the pool's that this script looks at afterwards) and
    # one for the queue declaration.
    assert found["clients"] <= 3, found
    assert not found["left"]
    # Messages and task-sent events go in pipelines of canvas.PUBLISH_BATCH commands,
    # never in a round trip each: the first group's at once (the workers start on it),
    # then the other 9 messages and 9 events in one pipeline here.
    assert not {"LPUSH", "PUBLISH"} & set(found["single"]), found["single"]
    sends = [sorted(p) for p in found["pipelined"] if {"LPUSH", "PUBLISH"} & set(p)]
    assert sends == [["LPUSH"] * 3 + ["PUBLISH"] * 3, ["LPUSH"] * 9 + ["PUBLISH"] * 9], sends
    client = redis.Redis.from_url(private_redis)
    messages = [json.loads(m) for m in client.lrange("gpu:4", 0, -1)]
    assert len(messages) == 12
    groups = {m["headers"]["group"] for m in messages}
    assert len(groups) == 4 and all(m["headers"]["task"] == "tasks.train_run" for m in messages)
    assert [int(client.get(f"celery-taskset-meta-{g}.s") or 0) for g in groups] == [3, 3, 3, 3]


BROKEN_PUBLISH = """
import sys
from kombu.exceptions import BatchPublishError
from kombu.transport import redis as kombu_redis
from orchestrator.cli import main

def flush(self):
    if self._buffered:
        try:
            raise ConnectionError("Connection reset by peer")
        except ConnectionError as exc:
            raise BatchPublishError("Redis publish batch failed; delivery is uncertain") from exc
kombu_redis.PublishBatch.flush = flush
sys.argv = ["orchestrator", *sys.argv[1:]]
main()
"""


def test_a_publish_that_breaks_off_says_to_submit_again(private_redis: str, tmp_path: Path,
                                                        write_experiment) -> None:
    config = write_experiment("c", trainer="prior", datasets=["iris"], folds=3, seeds=[0])
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-c", BROKEN_PUBLISH, "submit", str(config), "--broker",
                           private_redis, "--results-root", str(tmp_path / "results")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # errors.EXIT_ENVIRONMENT
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"publishing to the broker at {private_redis} broke off part-way" in message, message
    assert "Connection reset by peer" in message and "Submit the same configs again" in message
    assert redis.Redis.from_url(private_redis).llen("gpu:4") == 0  # nothing was sent


def test_submitting_imports_no_numpy_and_a_wait_polls_faster_at_first(write_experiment) -> None:
    """`orchestrator submit` starts publishing sooner without numpy (about 0.1 s of
    imports here): validating a config needs no data. A wait sees a short experiment's
    end within 50 ms, and a long one polls at most once a second."""
    from orchestrator.views.progress import poll_interval

    config = write_experiment("c", trainer="mlp", datasets=["iris"], folds=3, seeds=[0])
    probe = ("import sys\nfrom orchestrator.experiment.config import load_experiments\nfrom orchestrator.experiment.expand import expand\n"
             "from orchestrator import cli\nfrom orchestrator.dispatch import canvas\n"
             f"runs = expand(load_experiments([{str(config)!r}])[0])\n"
             "print(len(runs), sorted(m for m in ('numpy', 'sklearn', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "[]"]
    assert [poll_interval(t) for t in (0.0, 3.0, 10.0, 60.0, 3600.0)] == [0.05, 0.05, 0.1, 0.6, 1.0]


def test_install_compiles_every_module_of_the_project(tmp_path: Path) -> None:
    """scripts/install.sh's compileall line, run on a clean copy of the tree, leaves a
    checked-hash .pyc for every module of the project (so a process where
    PYTHONDONTWRITEBYTECODE is set compiles nothing of ours), and names what the
    benchmarks compile (benchmarks/trees.py). (It fails without that line: every module
    then comes from its source.)"""
    from benchmarks.trees import COMPILED

    lines = [line for line in (REPO / "scripts" / "install.sh").read_text().splitlines()
             if "-m compileall" in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0].replace('"$PY"', sys.executable))
    assert argv[argv.index("--invalidation-mode") + 1] == "checked-hash"
    assert argv[-len(COMPILED):] == COMPILED
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "benchmarks"}
    assert packages == {"orchestrator", "tasks"}, "a new package: add it to install.sh and trees.COMPILED"
    for name in packages:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "celeryconfig.py", tmp_path)
    subprocess.run(argv, cwd=tmp_path, check=True)
    modules = [p for name in sorted(packages) for p in (tmp_path / name).rglob("*.py")]
    modules.append(tmp_path / "celeryconfig.py")
    for module in modules:
        pyc = Path(importlib.util.cache_from_source(str(module)))
        assert pyc.is_file(), f"{module.relative_to(tmp_path)} was not compiled"
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b11, f"{pyc.name}: flags {flags:#b}, not checked-hash"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONVERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", "import orchestrator.cli, tasks.training"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, check=True)
    ours = [line for line in proc.stderr.splitlines()
            if line.startswith("# code object from") and str(tmp_path) in line]
    assert ours, "no module of the tree was imported"
    assert all(".pyc" in line for line in ours), [line for line in ours if ".pyc" not in line][:5]
