"""A fake NVML binding: the subset of pynvml's API that orchestrator.cluster.gpu calls.

It is injected at the one seam orchestrator.cluster.gpu has: in-process with
`gpu.use_nvml(FakeNVML(machine))`, or in a subprocess with
`ORCH_NVML_MODULE=tests.fake_nvml ORCH_FAKE_NVML=/path/machine.json`, where the JSON
file is read again at every nvmlInit() (a test may rewrite it between calls).

A machine description:
    {"driver": "550.54.15",                      # null: no driver (nvmlInit fails)
     "gpus": [{"name": "NVIDIA H100", "memory_total_mb": 81559, "memory_used_mb": 1024,
               "utilization": 37, "uuid": "GPU-...",
               "processes": [{"pid": 1234, "used_memory_mb": 900}]}]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NVMLError(Exception):
    """What pynvml raises."""


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None  # pynvml's field name


class FakeNVML:
    """One fake machine; its methods are pynvml's functions of the same names."""

    NVMLError = NVMLError

    def __init__(self, machine: dict[str, Any]):
        self.machine = machine
        self.initialised = 0

    def _gpu(self, handle: int) -> dict[str, Any]:
        gpus: list[dict[str, Any]] = self.machine.get("gpus", [])
        return gpus[handle]

    def nvmlInit(self) -> None:
        if self.machine.get("driver") is None:
            raise NVMLError("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.machine["driver"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self.machine.get("gpus", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < self.nvmlDeviceGetCount():
            raise NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return str(self._gpu(handle)["name"]).encode()  # old pynvml returns bytes

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self._gpu(handle).get("uuid", f"GPU-fake-{handle}"))

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        gpu = self._gpu(handle)
        total, used = gpu["memory_total_mb"] * 2**20, gpu.get("memory_used_mb", 0) * 2**20
        return _Memory(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Utilization:
        gpu = self._gpu(handle)
        if gpu.get("utilization") is None:
            raise NVMLError("Not Supported")
        return _Utilization(gpu=int(gpu["utilization"]), memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Process]:
        return [_Process(p["pid"], None if p.get("used_memory_mb") is None else p["used_memory_mb"] * 2**20)
                for p in self._gpu(handle).get("processes", [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[_Process]:
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        return b"/usr/bin/unknown"


# --- module-level API, for ORCH_NVML_MODULE=tests.fake_nvml in subprocesses ----------
_machine = FakeNVML({"driver": None})


def _load() -> FakeNVML:
    global _machine
    path = os.environ.get("ORCH_FAKE_NVML")
    _machine = FakeNVML(json.loads(Path(path).read_text()) if path else {"driver": None})
    return _machine


def nvmlInit() -> None:
    _load().nvmlInit()


def __getattr__(name: str) -> Any:
    if name.startswith("nvml"):
        return getattr(_machine, name)
    raise AttributeError(name)
