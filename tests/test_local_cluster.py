"""Which workers local mode starts (no processes: the command lines only)."""

from __future__ import annotations

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
