"""GPU detection through NVML. Returns [] when there is no NVIDIA driver."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int


def detect() -> list[GPU]:
    """Every GPU NVML sees; NVML is loaded here only, never CUDA."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no library: a CPU machine
        return []
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(GPU(index=i, name=name.decode() if isinstance(name, bytes) else str(name),
                             memory_total_mb=int(mem.total) // 2**20,
                             memory_free_mb=int(mem.free) // 2**20))
        return found
    finally:
        pynvml.nvmlShutdown()
