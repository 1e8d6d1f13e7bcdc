"""GPU detection, the worker registry, `workers up/down/list`, `worker --exit-when-idle`.

GPUs are faked at the one NVML seam (orchestrator.cluster.gpu.nvml: tests/fake_nvml.py); Redis
and the Celery workers are real: a private redis-server for this module, real
`orchestrator worker` processes started by a real supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from orchestrator import keys
from orchestrator.cli.worker import celery_worker_command
from orchestrator.cluster import gpu, registry, supervisor
from orchestrator.cluster.local import spawn, stop_process

from .conftest import celery_app, cli_env, run_cli, wait_for
from .fake_nvml import FakeNVML

HOST = socket.gethostname()
SHORT = HOST.split(".")[0]

TWO_GPUS: dict[str, Any] = {
    "driver": "550.54.15",
    "gpus": [
        {"name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559, "memory_used_mb": 1559,
         "utilization": 37, "uuid": "GPU-aaaa"},
        {"name": "NVIDIA A10", "memory_total_mb": 23028, "memory_used_mb": 0, "utilization": None},
    ],
}


@pytest.fixture
def fake_machine(tmp_path: Path) -> Iterator[Any]:
    """Writes a fake NVML machine description; returns (write, environment for the CLI)."""
    path = tmp_path / "nvml.json"

    def write(machine: dict[str, Any]) -> dict[str, str]:
        path.write_text(json.dumps(machine))
        return {"ORCH_NVML_MODULE": "tests.fake_nvml", "ORCH_FAKE_NVML": str(path)}

    yield write


def _records(url: str) -> dict[str, registry.WorkerRecord]:
    return {r.name: r for r in registry.list_workers(registry.client(url))}


# --- GPU detection -----------------------------------------------------------------

def test_inventory_reads_memory_utilisation_and_processes_through_the_seam() -> None:
    machine = json.loads(json.dumps(TWO_GPUS))
    machine["gpus"][0]["processes"] = [{"pid": os.getpid(), "used_memory_mb": 1500},
                                       {"pid": 2**22 + 17, "used_memory_mb": None}]
    fake = FakeNVML(machine)
    gpu.use_nvml(fake)
    try:
        inv = gpu.inventory()
        detected = gpu.detect()
    finally:
        gpu.use_nvml(None)
    assert inv.driver and inv.driver_version == "550.54.15" and inv.error == ""
    first, second = inv.gpus
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-aaaa")
    assert (first.memory_total_mb, first.memory_used_mb, first.memory_free_mb) == (81559, 1559, 80000)
    assert first.utilization_pct == 37 and second.utilization_pct is None  # "Not Supported"
    me, gone = first.processes
    assert (me.pid, me.name, me.used_memory_mb) == (os.getpid(), psutil.Process().name(), 1500)
    assert (gone.name, gone.used_memory_mb) == ("unknown", None)  # not visible here: NVML's name
    assert second.processes == ()
    assert [g.index for g in detected] == [0, 1] and detected[0].processes == ()  # detect(): no process scan
    assert fake.initialised == 0  # every nvmlInit was matched by nvmlShutdown


def test_inventory_without_a_driver_says_why() -> None:
    gpu.use_nvml(FakeNVML({"driver": None}))
    try:
        inv = gpu.inventory()
        assert gpu.detect() == []
    finally:
        gpu.use_nvml(None)
    assert not inv.driver and inv.gpus == [] and "Library Not Found" in inv.error


def test_gpus_command_lists_gpus_and_says_plainly_when_there_is_no_driver(fake_machine: Any) -> None:
    env = cli_env(**fake_machine(TWO_GPUS))
    data = json.loads(run_cli("gpus", "--json", env=env).stdout)
    assert data["driver"] is True and data["host"] == HOST and data["owners_known"] is False
    assert [(g["index"], g["name"], g["memory_free_mb"], g["utilization_pct"], g["workers"])
            for g in data["gpus"]] == [(0, "NVIDIA H100 80GB HBM3", 80000, 37, []),
                                      (1, "NVIDIA A10", 23028, None, [])]
    table = run_cli("gpus", env=cli_env(COLUMNS="200", **fake_machine(TWO_GPUS)))
    assert table.returncode == 0
    assert "NVIDIA A10" in table.stdout and "1559 / 81559 MiB" in table.stdout and "37%" in table.stdout
    assert "give --broker" in table.stderr  # says why the worker column is empty

    none = run_cli("gpus", env=cli_env(**fake_machine({"driver": None})))
    assert none.returncode == 0
    assert "no NVIDIA driver" in none.stdout and "--cpu N" in none.stdout
    data = json.loads(run_cli("gpus", "--json", env=cli_env(**fake_machine({"driver": None}))).stdout)
    assert data["driver"] is False and data["gpus"] == [] and data["error"]


# --- what `workers up` starts --------------------------------------------------------

def test_worker_command_binds_one_gpu_and_passes_exit_when_idle() -> None:
    argv, env = celery_worker_command(gpu=1, exit_when_idle=2.5, environ={"ORCH_EXIT_WHEN_IDLE": "9"})
    assert argv[argv.index("-Q") + 1] == f"rank.gpu1@{socket.gethostname()},gpu.{SHORT}.1,gpu" and argv[argv.index("-n") + 1] == "gpu1@%h"
    assert argv[argv.index("-c") + 1] == "1"
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"], env["ORCH_DEVICE"], env["ORCH_GPU"]) == \
        ("1", "PCI_BUS_ID", "cuda", "1")
    assert env["ORCH_EXIT_WHEN_IDLE"] == "2.5"
    argv, env = celery_worker_command(cpu=True, environ={"ORCH_EXIT_WHEN_IDLE": "9", "ORCH_GPU": "3"})
    assert "ORCH_EXIT_WHEN_IDLE" not in env and "ORCH_GPU" not in env and env["CUDA_VISIBLE_DEVICES"] == ""


def test_worker_commands_one_per_selected_gpu_with_unique_names() -> None:
    commands = supervisor.worker_commands([0, 2], per_gpu=2, cpu=1, control=True, exit_when_idle=5)
    assert [(c.label, c.node, c.gpu) for c in commands] == [
        ("gpu0-0", "gpu0-0@%h", 0), ("gpu0-1", "gpu0-1@%h", 0), ("gpu2-0", "gpu2-0@%h", 2),
        ("gpu2-1", "gpu2-1@%h", 2), ("cpu1", "cpu1@%h", None), ("control", "control@%h", None)]
    gpu21 = commands[3].argv
    assert gpu21[gpu21.index("--gpu") + 1] == "2" and gpu21[gpu21.index("--name") + 1] == "gpu2-1@%h"
    assert all(c.argv[c.argv.index("--exit-when-idle") + 1] == "5" for c in commands)
    assert [c.label for c in supervisor.worker_commands([3])] == ["gpu3"]  # one per GPU: plain gpuN


def test_return_results_reaches_training_workers_only() -> None:
    _, env = celery_worker_command(cpu=True, return_results=True, environ={})
    assert env["ORCH_RESULTS_TRANSFER"] == "return"
    _, env = celery_worker_command(gpu=0, environ={"ORCH_RESULTS_TRANSFER": "return"})
    assert env["ORCH_RESULTS_TRANSFER"] == "return"  # from the environment (systemd, batch job)
    _, env = celery_worker_command(control=True, environ={})
    assert "ORCH_RESULTS_TRANSFER" not in env
    commands = supervisor.worker_commands([0], cpu=1, control=True, return_results=True)
    assert [("--return-results" in c.argv) for c in commands] == [True, True, False]


@pytest.mark.parametrize(("args", "env", "message"), [
    (["worker", "--cpu", "--control", "--return-results"], {}, "a control worker cannot return results"),
    (["worker", "--control"], {"ORCH_RESULTS_TRANSFER": "return"}, "a control worker cannot return results"),
    (["worker", "--cpu"], {"ORCH_RESULTS_TRANSFER": "nfs"}, "ORCH_RESULTS_TRANSFER='nfs' is not valid"),
    (["worker", "--cpu", "--return-results"], {"ORCH_RETURN_MAX_MB": "0"}, "ORCH_RETURN_MAX_MB='0' is not valid"),
    (["workers", "up", "--cpu", "1", "--control", "--return-results", "--broker", "redis://127.0.0.1:1/0"], {},
     "--control and --return-results exclude each other"),
])
def test_return_results_misuse_is_a_clear_error(args: list[str], env: dict[str, str], message: str) -> None:
    proc = run_cli(*args, env=cli_env(**env))
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split())


def test_workers_up_refuses_bad_gpu_selections(fake_machine: Any, module_redis: str, tmp_path: Path) -> None:
    base = {"ORCH_BROKER_URL": module_redis, "ORCH_RESULTS_ROOT": str(tmp_path / "r")}
    state = ["--state-dir", str(tmp_path / "state")]
    bad = run_cli("workers", "up", "--gpus", "0,5", *state, env=cli_env(**base, **fake_machine(TWO_GPUS)))
    assert bad.returncode == 2 and "no GPU 5 on this host; valid: 0, 1" in bad.stderr
    twice = run_cli("workers", "up", "--gpus", "1,1", *state, env=cli_env(**base, **fake_machine(TWO_GPUS)))
    assert twice.returncode == 2 and "--per-gpu" in twice.stderr
    nodriver = run_cli("workers", "up", *state, env=cli_env(**base, **fake_machine({"driver": None})))
    assert nodriver.returncode == 2
    assert "no NVIDIA driver" in nodriver.stderr and "--cpu N" in nodriver.stderr
    nobroker = run_cli("workers", "up", "--cpu", "1", *state, env=cli_env(**fake_machine({"driver": None})))
    assert nobroker.returncode == 2 and "no broker configured" in nobroker.stderr
    assert not (tmp_path / "state" / "supervisor.pid").exists()  # nothing was started
    gone = run_cli("workers", "down", *state, env=cli_env())
    assert gone.returncode == 0 and "no worker supervisor is running" in gone.stdout


# --- the supervisor alone (plain processes, no Celery) -------------------------------

def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crash = supervisor.WorkerCommand("crash", "crash@%h", None, [sys.executable, "-c", "raise SystemExit(3)"])
    sup = supervisor.Supervisor([crash], supervisor.StateDir(tmp_path), dict(os.environ), max_failures=2,
                           backoff_base=0.3, stable_seconds=30)
    started = time.monotonic()
    assert sup.run() == 1
    assert time.monotonic() - started >= 0.3 + 0.6  # waited 0.3 s, then twice that
    status = json.loads((tmp_path / "supervisor.json").read_text())["workers"]["crash"]
    assert (status["state"], status["restarts"], status["exit_codes"]) == ("failed", 2, [3, 3, 3])
    log = capsys.readouterr().out
    assert "restarting in 0.3s" in log and "restarting in 0.6s" in log and "not restarting it" in log
    assert not (tmp_path / "supervisor.pid").exists()


def test_supervisor_with_exit_when_idle_lets_a_clean_exit_be(tmp_path: Path) -> None:
    done = supervisor.WorkerCommand("w", "w@%h", None, [sys.executable, "-c", "pass"])
    sup = supervisor.Supervisor([done], supervisor.StateDir(tmp_path), dict(os.environ), exit_when_idle=True)
    assert sup.run() == 0
    status = json.loads((tmp_path / "supervisor.json").read_text())["workers"]["w"]
    assert (status["state"], status["restarts"], status["exit_codes"]) == ("done", 0, [0])


# --- the registry -------------------------------------------------------------------

def test_registry_records_expire_and_only_their_owner_removes_them(module_redis: str) -> None:
    client = registry.client(module_redis.rsplit("/", 1)[0] + "/1")  # db 1: away from the workers' db
    now = time.time()
    rec = registry.WorkerRecord(name="gpu0@h1", host="h1", pid=111, gpu=0, device="cuda", queues=["gpu"],
                             state="idle", started=now, heartbeat=now)
    registry.register(client, rec, ttl=30)
    registry.register(client, registry.WorkerRecord(**{**rec.__dict__, "name": "cpu1@h1", "gpu": None}), ttl=1)
    assert [r.name for r in registry.list_workers(client)] == ["cpu1@h1", "gpu0@h1"]
    assert registry.list_workers(client)[1] == rec
    assert registry.unregister(client, "gpu0@h1", pid=222) is False  # a successor's record stays
    wait_for(lambda: [r.name for r in registry.list_workers(client)] == ["gpu0@h1"], timeout=10,
             what="the 1-second record to expire")
    assert registry.unregister(client, "gpu0@h1", pid=111) is True and registry.list_workers(client) == []
    client.hset(keys.ACTIVE, mapping={"r1": json.dumps({"worker": "gpu0@h1", "name": "e/iris/base/seed=0/fold=1"}),
                                           "r2": "not json",
                                           "r3": json.dumps({"worker": "gpu0@h1", "token": None,
                                                             "revoked_token": "t", "name": "old"})})
    assert registry.current_runs(client) == {"gpu0@h1": [{"run_id": "r1", "worker": "gpu0@h1",
                                                        "name": "e/iris/base/seed=0/fold=1"}]}
    client.flushdb()


def test_idle_check_counts_messages_of_every_priority(module_redis: str) -> None:
    from tasks.idle import queued as _queued

    app = celery_app(module_redis.rsplit("/", 1)[0] + "/2")
    with app.connection_for_write() as conn:
        assert _queued(["fleet-idle-a", "fleet-idle-b"], conn) == 0  # never declared: empty
        app.send_task("tests.nothing", queue="fleet-idle-a", priority=0)
        app.send_task("tests.nothing", queue="fleet-idle-a", priority=9)
        app.send_task("tests.nothing", queue="fleet-idle-b")
        assert _queued(["fleet-idle-a"], conn) == 2 and _queued(["fleet-idle-a", "fleet-idle-b"], conn) == 3
        conn.default_channel.client.flushdb()


# --- real workers -------------------------------------------------------------------

def _kill_leftovers(state: Path) -> None:
    """If a test failed half way: stop the supervisor and its workers, whatever happens."""
    run_cli("workers", "down", "--state-dir", str(state), "--timeout", "30", env=cli_env())
    status = supervisor.StateDir(state).read_status() or {}
    for pid in [status.get("pid")] + [w.get("pid") for w in status.get("workers", {}).values()]:
        if pid:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.mark.integration
def test_workers_up_list_restart_down(module_redis: str, fake_machine: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = cli_env(ORCH_BROKER_URL=module_redis, ORCH_RESULTS_ROOT=str(tmp_path / "results"), ORCH_PRELOAD="0",
                  ORCH_WORKER_HEARTBEAT="1", **fake_machine(TWO_GPUS))
    up = run_cli("workers", "up", "--gpus", "1", "--cpu", "1", "--state-dir", str(state), "--wait", "120",
                 env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "2 workers registered" in up.stdout
        again = run_cli("workers", "up", "--cpu", "1", "--state-dir", str(state), env=env)
        assert again.returncode == 2 and "already runs workers" in again.stderr

        rows = {r["name"]: r for r in json.loads(run_cli("workers", "list", "--json", env=env).stdout)}
        assert set(rows) == {f"gpu1@{HOST}", f"cpu1@{HOST}"}
        g, c = rows[f"gpu1@{HOST}"], rows[f"cpu1@{HOST}"]
        assert (g["gpu"], g["device"], g["host"], sorted(g["queues"])) == (1, "cuda", HOST, ["gpu", f"gpu.{SHORT}.1",
                                                                                         f"rank.gpu1@{HOST}"])
        assert (c["gpu"], c["device"], c["queues"], c["state"]) == (None, "cpu", ["cpu", f"rank.cpu1@{HOST}"], "idle")  # sorted
        assert g["heartbeat_age"] < 5 and c["current_runs"] == []
        # The GPU worker is forked from the supervisor (cluster.warm), so its /proc/PID/environ
        # is the supervisor's; its record's gpu and device come from the environment that
        # names its CUDA_VISIBLE_DEVICES (test_local_cluster: what a forked child's getenv sees).
        supervisor_pid = json.loads((state / "supervisor.json").read_text())["pid"]
        assert psutil.Process(g["pid"]).cmdline() == psutil.Process(supervisor_pid).cmdline()  # forked, not exec'd

        # `gpus` names the owner of each GPU and of each process on it (a pool child here).
        pool_child = psutil.Process(g["pid"]).children()[0].pid
        machine = json.loads(json.dumps(TWO_GPUS))
        machine["gpus"][1]["processes"] = [{"pid": pool_child, "used_memory_mb": 700}]
        gpus = json.loads(run_cli("gpus", "--json", env={**env, **fake_machine(machine)}).stdout)
        assert gpus["owners_known"] is True
        assert [x["workers"] for x in gpus["gpus"]] == [[], [f"gpu1@{HOST}"]]
        assert gpus["gpus"][1]["processes"][0]["worker"] == f"gpu1@{HOST}"

        # "current run" comes from the run leases' hash (written by training workers;
        # simulated here in this module's private Redis).
        redis.Redis.from_url(module_redis).hset(keys.ACTIVE, "run-1", json.dumps(
            {"worker": f"cpu1@{HOST}", "name": "exp/iris/base/seed=0/fold=2", "experiment": "exp",
             "started": time.time()}))
        listing = run_cli("workers", "list", env=cli_env(COLUMNS="250", ORCH_BROKER_URL=module_redis))
        assert "exp/iris/base/seed=0/fold=2" in listing.stdout and f"gpu1@{HOST}" in listing.stdout
        redis.Redis.from_url(module_redis).delete(keys.ACTIVE)

        # A worker that dies (its whole process group, like a crash) is started again.
        os.killpg(c["pid"], signal.SIGKILL)
        restarted = wait_for(lambda: (r := _records(module_redis).get(f"cpu1@{HOST}")) and r.pid != c["pid"] and r,
                             timeout=90, what="cpu1 to be restarted and registered")
        status = json.loads((state / "supervisor.json").read_text())["workers"]
        assert (status["cpu1"]["restarts"], status["cpu1"]["exit_codes"]) == (1, [-signal.SIGKILL])
        assert status["gpu1"]["restarts"] == 0

        down = run_cli("workers", "down", "--state-dir", str(state), env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped: cpu1 (stopped), gpu1 (stopped)" in down.stdout
        assert _records(module_redis) == {}  # each worker removed its own record on the way out
        assert not any(psutil.pid_exists(p) for p in (g["pid"], restarted.pid, pool_child))
        assert not (state / "supervisor.pid").exists()
    finally:
        _kill_leftovers(state)


@pytest.mark.integration
def test_worker_exits_when_idle_after_its_run(module_redis: str, tmp_path: Path, write_experiment: Any) -> None:
    root = tmp_path / "results"
    env = cli_env(ORCH_BROKER_URL=module_redis, ORCH_RESULTS_ROOT=str(root), ORCH_PRELOAD="0",
                  ORCH_WORKER_HEARTBEAT="1")
    config = write_experiment("idle_exit", trainer="slow", datasets=["iris"], split={"validation": 0.25},
                              params={"seconds": 3}, resources={"gpus": 0})
    submitted = run_cli("submit", str(config), env=env)
    assert submitted.returncode == 0, submitted.stderr
    log = tmp_path / "worker.log"
    started = time.monotonic()
    proc = spawn([sys.executable, "-m", "orchestrator", "worker", "--cpu", "--name", "idler@%h",
                  "--exit-when-idle", "2"], env, log)
    try:
        busy = wait_for(lambda: (r := _records(module_redis).get(f"idler@{HOST}")) and r.state == "busy" and r,
                        timeout=90, what="the worker to take the queued run")
        assert busy.exit_when_idle == 2.0 and busy.active == 1
        assert proc.wait(timeout=90) == 0  # it left by itself, cleanly
        lifetime = time.monotonic() - started
        assert lifetime > 3 + 2  # the 3-second run, then 2 idle seconds
        status = json.loads(run_cli("status", "idle_exit", "--json", env=env).stdout)
        assert status["runs"] == {"DONE": 1}
        assert status["group_details"][0]["folds"][0]["worker"] == f"idler@{HOST}"
        assert "shutting down (--exit-when-idle)" in log.read_text()
        assert f"idler@{HOST}" not in _records(module_redis)
    finally:
        stop_process(proc)


@pytest.mark.integration
def test_down_drain_lets_the_running_run_finish(module_redis: str, tmp_path: Path, write_experiment: Any) -> None:
    state = tmp_path / "state"
    env = cli_env(ORCH_BROKER_URL=module_redis, ORCH_RESULTS_ROOT=str(tmp_path / "results"), ORCH_PRELOAD="0",
                  ORCH_WORKER_HEARTBEAT="1")
    config = write_experiment("drain", trainer="slow", datasets=["iris"], split={"validation": 0.25},
                              params={"seconds": 4, "smoothing": 0.5}, resources={"gpus": 0})
    up = run_cli("workers", "up", "--cpu", "1", "--state-dir", str(state), env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert run_cli("submit", str(config), env=env).returncode == 0
        wait_for(lambda: (r := _records(module_redis).get(f"cpu1@{HOST}")) and r.state == "busy",
                 timeout=60, what="cpu1 to start the run")
        down = run_cli("workers", "down", "--drain", "--state-dir", str(state), env=env)
        assert down.returncode == 0 and "drain" in down.stdout
        status = json.loads(run_cli("status", "drain", "--json", env=env).stdout)
        fold = status["group_details"][0]["folds"][0]
        assert (fold["state"], fold["worker"], fold["attempt"]) == ("DONE", f"cpu1@{HOST}", 1)
    finally:
        _kill_leftovers(state)
