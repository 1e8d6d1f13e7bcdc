"""GPU admission, packing and isolation with real workers, a real Redis and a fake NVML
(the one seam: this machine has no GPU). Runs use trainers that need no CUDA."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster.local import spawn, start_redis, stop_process, stop_processes

from .conftest import cli_env, run_cli, wait_for

pytestmark = pytest.mark.integration


def machine(free_mb: list[int], total_mb: int = 16384) -> dict[str, Any]:
    return {"driver": "550.54.15", "gpus": [
        {"name": "NVIDIA Fake", "memory_total_mb": total_mb, "memory_used_mb": total_mb - free,
         "utilization": 0, "uuid": f"GPU-fake-{i}", "processes": []} for i, free in enumerate(free_mb)]}


class GpuCluster:
    def __init__(self, base: Path, url: str):
        self.base, self.url = base, url
        self.root = base / "results"
        self.nvml = base / "machine.json"
        self.procs: dict[str, Any] = {}

    def env(self) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root),
                       ORCH_NVML_MODULE="tests.fake_nvml", ORCH_FAKE_NVML=str(self.nvml))

    def set_free(self, free_mb: list[int]) -> None:
        tmp = self.nvml.with_suffix(".tmp")
        tmp.write_text(json.dumps(machine(free_mb)))
        tmp.replace(self.nvml)

    def start(self, name: str, *args: str) -> None:
        argv = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO", *args, "--name", f"{name}@%h"]
        self.procs[name] = spawn(argv, self.env(), self.base / f"{name}.log")

    def log(self, name: str) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self) -> None:
        wait_for(lambda: all("ready." in self.log(n) for n in self.procs), timeout=90,
                 what="workers to be ready")

    def stop(self) -> None:
        stop_processes(self.procs.values())
        self.procs.clear()


@pytest.fixture
def gpus(tmp_path: Path) -> Iterator[GpuCluster]:
    redis_proc, url = start_redis(tmp_path / "redis")
    cluster = GpuCluster(tmp_path, url)
    try:
        yield cluster
    finally:
        cluster.stop()
        stop_process(redis_proc)


def folds(cluster: GpuCluster, name: str) -> list[dict[str, Any]]:
    proc = run_cli("status", name, "--json", env=cluster.env())
    assert proc.returncode == 0, proc.stderr
    return [f for g in json.loads(proc.stdout)["group_details"] for f in g["folds"]]


def intervals(cluster: GpuCluster, name: str) -> list[tuple[float, float]]:
    out = []
    for path in sorted((cluster.root / name).glob("**/status/fold_*.json")):
        record = json.loads(path.read_text())
        out.append((float(record["started_at"]), float(record["finished_at"])))
    return out


def overlap(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


def test_a_gpu_short_of_memory_hands_runs_to_another_and_waits(gpus: GpuCluster, write_experiment: Any) -> None:
    gpus.set_free([2048, 40000])  # GPU 0: someone else's process holds 14 GiB
    gpus.start("gpu0", "--gpu", "0")
    gpus.start("gpu1", "--gpu", "1")
    gpus.start("control", "--control")
    gpus.wait_ready()
    cfg = write_experiment("adm", trainer="pid", datasets=["iris"], folds=4,
                           resources={"gpus": 1, "gpu_memory_gb": 4})
    proc = run_cli("submit", str(cfg), "--wait", env=gpus.env(), timeout=180)
    assert proc.returncode == 0, proc.stderr
    done = folds(gpus, "adm")
    assert [f["state"] for f in done] == ["DONE"] * 4
    assert {f["worker"].split("@")[0] for f in done} == {"gpu1"}  # never on the short GPU
    # Isolation: each run trained in a fresh process of the GPU worker.
    pids = [json.loads(Path(f["files"]["metadata.json"]).read_text())["trainer_info"]["pid"]
            for f in (ff for ff in json.loads(run_cli("status", "adm", "--json", env=gpus.env()).stdout)
                      ["group_details"][0]["folds"])]
    assert len(set(pids)) == 4, pids


def test_a_waiting_gpu_takes_runs_again_once_memory_frees(gpus: GpuCluster, write_experiment: Any) -> None:
    gpus.set_free([2048])
    gpus.start("gpu0", "--gpu", "0")
    gpus.start("control", "--control")
    gpus.wait_ready()
    cfg = write_experiment("adm_wait", trainer="pid", datasets=["iris"], folds=2,
                           resources={"gpus": 1, "gpu_memory_gb": 4})
    assert run_cli("submit", str(cfg), env=gpus.env()).returncode == 0
    wait_for(lambda: "waiting for the GPU" in gpus.log("gpu0"), timeout=30, what="the run to be handed back")
    assert all(f["state"] in ("NEW", "PENDING") for f in folds(gpus, "adm_wait"))
    assert "FAILED" not in json.dumps(folds(gpus, "adm_wait"))
    gpus.set_free([12000])  # the other user's job ended
    wait_for(lambda: [f["state"] for f in folds(gpus, "adm_wait")] == ["DONE", "DONE"], timeout=60,
             what="both runs DONE once memory is free")
    assert "taking runs again" in gpus.log("gpu0")


def test_fractional_runs_share_a_gpu_and_whole_ones_do_not(gpus: GpuCluster, write_experiment: Any) -> None:
    gpus.set_free([40000])
    gpus.start("gpu0a", "--gpu", "0")  # two workers on one GPU: `workers up --per-gpu 2`
    gpus.start("gpu0b", "--gpu", "0")
    gpus.start("control", "--control")
    gpus.wait_ready()
    half = write_experiment("half", trainer="slow", datasets=["iris"], folds=2,
                            params={"seconds": 2.0}, resources={"gpus": 0.5, "gpu_memory_gb": 1})
    assert run_cli("submit", str(half), "--wait", env=gpus.env(), timeout=120).returncode == 0
    assert overlap(intervals(gpus, "half")), intervals(gpus, "half")
    whole = write_experiment("whole", trainer="slow", datasets=["iris"], folds=2,
                             params={"seconds": 2.0}, resources={"gpus": 1, "gpu_memory_gb": 1})
    assert run_cli("submit", str(whole), "--wait", env=gpus.env(), timeout=120).returncode == 0
    assert [f["state"] for f in folds(gpus, "whole")] == ["DONE", "DONE"]
    assert not overlap(intervals(gpus, "whole")), intervals(gpus, "whole")


def test_cuda_out_of_memory_retries_with_cuda_oom_overrides_or_fails_saying_so(
        gpus: GpuCluster, write_experiment: Any) -> None:
    gpus.set_free([40000])
    gpus.start("gpu0", "--gpu", "0")
    gpus.start("control", "--control")
    gpus.wait_ready()
    saved = write_experiment("oom_saved", trainer="oom", datasets=["iris"], folds=2,
                             params={"batch_size": 64}, cuda={"batch_size": 128},
                             cuda_oom={"batch_size": 16}, resources={"gpus": 1, "gpu_memory_gb": 1})
    proc = run_cli("submit", str(saved), "--wait", env=gpus.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for path in sorted((gpus.root / "oom_saved").glob("**/status/fold_*.json")):
        record = json.loads(path.read_text())
        assert record["status"] == "DONE" and record["oom_overrides"] is True
        assert [h["outcome"] for h in record["history"]] == ["RETRY", "DONE"]
    meta = next((gpus.root / "oom_saved").glob("**/fold_0/metadata.json"))
    assert json.loads(meta.read_text())["params_resolved"]["batch_size"] == 16

    doomed = write_experiment("oom_doomed", trainer="oom", datasets=["iris"], folds=2, retries=3,
                              params={"batch_size": 64}, resources={"gpus": 1, "gpu_memory_gb": 1})
    proc = run_cli("submit", str(doomed), "--wait", env=gpus.env(), timeout=120)
    assert proc.returncode == 1
    states = folds(gpus, "oom_doomed")
    assert [f["state"] for f in states] == ["FAILED", "FAILED"]
    assert all("CUDA out of memory" in f["error"] and "no cuda_oom overrides" in f["error"]
               and f["attempt"] == 1 for f in states), states  # not retried: it cannot help


def test_a_multi_gpu_run_gets_free_whole_gpus_of_one_host_and_sees_only_them(
        gpus: GpuCluster, write_experiment: Any) -> None:
    gpus.set_free([40000, 40000, 40000])
    gpus.start("gpu0", "--gpu", "0")  # a per-GPU worker on GPU 0
    gpus.start("multi", "--gpus", "0,1,2")  # the host's multi-GPU worker
    gpus.start("control", "--control")
    gpus.wait_ready()
    busy = write_experiment("busy0", trainer="slow", datasets=["iris"], folds=2,
                            params={"seconds": 6.0}, resources={"gpus": 1, "gpu_memory_gb": 1})
    assert run_cli("submit", str(busy), env=gpus.env()).returncode == 0
    wait_for(lambda: any(f["state"] == "IN_PROGRESS" for f in folds(gpus, "busy0")), timeout=60,
             what="GPU 0 to be busy with a whole-GPU run")
    pair = write_experiment("pair", trainer="visible", datasets=["iris"], folds=2,
                            resources={"gpus": 2, "gpu_memory_gb": 1})
    proc = run_cli("submit", str(pair), "--wait", env=gpus.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = []
    for f in folds(gpus, "pair"):
        assert f["state"] == "DONE" and f["worker"].startswith("multi@"), f
        meta = json.loads(next((gpus.root / "pair").glob(f"**/fold_{f['fold']}/metadata.json")).read_text())
        seen.append(meta["trainer_info"]["visible"])
    assert seen == ["1,2", "1,2"], seen  # two whole GPUs, never GPU 0 while it was taken
    assert run_cli("submit", str(busy), "--wait", env=gpus.env(), timeout=120).returncode == 0
