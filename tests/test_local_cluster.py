"""Which workers local mode starts (no processes: the command lines only)."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.cluster.local import LocalCluster


def _queues(cmd: list[str]) -> str:
    return " ".join(cmd[cmd.index("worker") + 1:])


def test_without_gpus_cpu_workers_take_every_run(tmp_path: Path) -> None:
    cmds = LocalCluster(tmp_path, cpu_workers=3).worker_commands()
    assert sorted(cmds) == ["control", "cpu1", "cpu2", "cpu3"]
    assert all("--accept-gpu-runs" in _queues(cmds[f"cpu{i}"]) for i in (1, 2, 3))


def test_one_worker_per_gpu_and_no_cpu_slots_unless_needed(tmp_path: Path) -> None:
    cmds = LocalCluster(tmp_path, gpus=[0, 2]).worker_commands()
    assert sorted(cmds) == ["control", "gpu0", "gpu2"]
    assert "--gpu 2" in _queues(cmds["gpu2"])


def test_cpu_runs_on_a_gpu_machine_get_cpu_workers(tmp_path: Path) -> None:
    cmds = LocalCluster(tmp_path, gpus=[0], cpu_workers=1, cpu_runs=True).worker_commands()
    assert sorted(cmds) == ["control", "cpu1", "gpu0"]
    assert "--accept-gpu-runs" not in _queues(cmds["cpu1"])  # GPU runs stay on the GPU


def test_every_worker_is_forked_a_gpu_worker_with_its_cuda_visible_devices(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, gpus=[0], cpu_workers=1, cpu_runs=True, preload=["prior"])
    cluster.workdir, cluster.broker_url = tmp_path, "redis://127.0.0.1:1/0"
    server_env = {"PATH": "/bin", "ORCH_TRAINER_MODULES": "tests.plugins"}
    env = {**server_env, "ORCH_BROKER_URL": cluster.broker_url, "ORCH_PRELOAD_TRAINERS": "prior"}
    plan = cluster.fork_plan(env, server_env)
    forked = {w["name"]: w for w in plan["workers"]}
    assert sorted(forked) == ["control", "cpu1", "gpu0"]
    cpu, control, gpu = forked["cpu1"], forked["control"], forked["gpu0"]
    assert (gpu["env"]["CUDA_VISIBLE_DEVICES"], gpu["env"]["ORCH_DEVICE"]) == ("0", "cuda")
    assert gpu["argv"][gpu["argv"].index("--max-tasks-per-child") + 1] == "1"  # a fresh process per run
    assert cpu["argv"][:3] == ["-A", "tasks", "worker"] and "cpu" in cpu["argv"][cpu["argv"].index("-Q") + 1]
    assert cpu["env"]["ORCH_DEVICE"] == "cpu" and cpu["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert cpu["env"]["ORCH_BROKER_URL"] == cluster.broker_url  # what the server lacks, as changes
    assert control["env"]["ORCH_PRELOAD"] == "0"
    assert plan["preload"] is True and plan["trainers"] == "prior"


def test_only_a_local_run_starts_the_fork_server_early() -> None:
    from orchestrator.cluster.prestart import wanted

    assert wanted(["orchestrator", "run", "x.yaml"], {})
    assert wanted(["/venv/lib/python3.11/site-packages/orchestrator/__main__.py", "run", "x.yaml"], {})
    assert not wanted(["pytest", "run"], {})  # importing the CLI elsewhere starts nothing
    assert not wanted(["orchestrator", "run", "x.yaml", "--broker", "redis://h:6379/0"], {})
    assert not wanted(["orchestrator", "run", "x.yaml", "--broker=redis://h:6379/0"], {})
    assert not wanted(["orchestrator", "run", "x.yaml"], {"ORCH_BROKER_URL": "redis://h:6379/0"})
    assert not wanted(["orchestrator", "run", "--help"], {})
    assert not wanted(["orchestrator", "submit", "x.yaml"], {})


def test_a_forked_child_environment_is_what_cuda_would_read(tmp_path: Path) -> None:
    """A forked worker's environment changes reach the C environment (getenv), which the
    CUDA runtime reads when a process initialises it: CUDA_VISIBLE_DEVICES set, a value
    of the parent's removed; the parent's own environment is untouched."""
    import ctypes
    import os

    from orchestrator.cluster.forkserver import Forked, fork_child

    out = tmp_path / "seen"

    def child() -> int:
        getenv = ctypes.CDLL(None).getenv
        getenv.restype = ctypes.c_char_p
        seen = [getenv(name.encode()) for name in ("CUDA_VISIBLE_DEVICES", "ORCH_TEST_PARENT_ONLY")]
        out.write_text(repr(seen))
        return 0

    os.environ["ORCH_TEST_PARENT_ONLY"] = "x"
    try:
        proc = Forked(fork_child(child, {"CUDA_VISIBLE_DEVICES": "3", "ORCH_TEST_PARENT_ONLY": None},
                                 str(tmp_path / "log")))
        while proc.poll() is None:
            time.sleep(0.01)
        assert os.environ.get("CUDA_VISIBLE_DEVICES") != "3" and os.environ["ORCH_TEST_PARENT_ONLY"] == "x"
    finally:
        del os.environ["ORCH_TEST_PARENT_ONLY"]
    assert proc.returncode == 0, (tmp_path / "log").read_text()
    assert out.read_text() == repr([b"3", None])
