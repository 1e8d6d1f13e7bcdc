"""GPU detection through NVML: devices, memory, utilisation and the processes on them.

NVML is reached through one seam, `nvml()`: the real `pynvml` module unless a test
installed another object with the same functions (`use_nvml`), or the environment
names a module with pynvml's API in ORCH_NVML_MODULE (how subprocess tests fake GPUs:
`ORCH_NVML_MODULE=tests.fake_nvml`). Only NVML is loaded here, never CUDA (design
invariant 5, docs/reliability.md): a parent that forks training processes may call this.

Fork safety: a GPU worker's main process queries NVML from a thread (its registry
heartbeat) while it forks a fresh training process for every run, and that process
queries NVML again (admission). A fork taken while the thread is inside NVML copies
NVML's locks held (pynvml's own, the driver library's) into a child that then hangs
at its first NVML call, as a real H100 worker did on its third run. So every NVML
session here runs under one lock that `os.fork` also takes (`os.register_at_fork`):
a fork waits for the NVML call in flight, and the child starts with a free lock.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import settings

_installed: Any = None
_sessions = threading.RLock()


def _new_lock_in_child() -> None:
    global _sessions
    _sessions = threading.RLock()


os.register_at_fork(before=lambda: _sessions.acquire(), after_in_parent=lambda: _sessions.release(),
                    after_in_child=_new_lock_in_child)


def _one_session_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an NVML session (init ... shutdown) under the fork-safety lock."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _sessions:
            return fn(*args, **kwargs)

    return wrapper


def use_nvml(module: Any) -> None:
    """Make `nvml()` return `module` (an object with pynvml's functions); None undoes it."""
    global _installed
    _installed = module


def nvml() -> Any:
    """The NVML binding in use: an installed fake, ORCH_NVML_MODULE, or pynvml."""
    if _installed is not None:
        return _installed
    return importlib.import_module(settings.value("ORCH_NVML_MODULE") or "pynvml")


@dataclass(frozen=True)
class GPUProcess:
    pid: int
    name: str  # "?" when the process is not visible from here (another container)
    used_memory_mb: int | None  # None where the driver does not report it


@dataclass(frozen=True)
class GPU:
    index: int  # NVML index = PCI bus order = CUDA_VISIBLE_DEVICES with CUDA_DEVICE_ORDER=PCI_BUS_ID
    name: str
    memory_total_mb: int
    memory_free_mb: int
    uuid: str = ""
    memory_used_mb: int = 0
    utilization_pct: int | None = None  # None where the device does not report it (MIG, old cards)
    processes: tuple[GPUProcess, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inventory:
    """What NVML says about this host: whether a driver answered, its version, the GPUs."""

    driver: bool
    driver_version: str = ""
    error: str = ""  # why NVML could not be used, when driver is False
    gpus: list[GPU] = field(default_factory=list)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(fn: Any, *args: Any) -> Any:
    """An NVML query that some devices do not support: None instead of an error."""
    try:
        return fn(*args)
    except Exception:
        return None


def _process_name(lib: Any, pid: int) -> str:
    try:
        import psutil

        return str(psutil.Process(pid).name())
    except Exception:  # gone, or in another PID namespace
        name = _optional(lib.nvmlSystemGetProcessName, pid)
        return os.path.basename(_text(name)) if name else "?"


def _processes(lib: Any, handle: Any) -> tuple[GPUProcess, ...]:
    seen: dict[int, GPUProcess] = {}
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(lib, query, None)
        for info in (_optional(fn, handle) if fn else None) or []:
            pid = int(info.pid)
            used = getattr(info, "usedGpuMemory", None)
            if pid not in seen:
                seen[pid] = GPUProcess(pid, _process_name(lib, pid),
                                       int(used) // 2**20 if used is not None else None)
    return tuple(sorted(seen.values(), key=lambda p: p.pid))


@_one_session_at_a_time
def inventory(processes: bool = True) -> Inventory:
    """Every GPU NVML sees, with memory, utilisation and (optionally) processes."""
    try:
        lib = nvml()
    except ImportError as exc:
        return Inventory(driver=False, error=f"the NVML binding is not installed ({exc})")
    try:
        lib.nvmlInit()
    except Exception as exc:  # no driver, no library: a CPU machine
        return Inventory(driver=False, error=str(exc) or type(exc).__name__)
    try:
        version = _text(_optional(lib.nvmlSystemGetDriverVersion) or "")
        found = []
        for i in range(lib.nvmlDeviceGetCount()):
            handle = lib.nvmlDeviceGetHandleByIndex(i)
            mem = lib.nvmlDeviceGetMemoryInfo(handle)
            util = _optional(lib.nvmlDeviceGetUtilizationRates, handle)
            found.append(GPU(index=i, name=_text(lib.nvmlDeviceGetName(handle)),
                             memory_total_mb=int(mem.total) // 2**20,
                             memory_free_mb=int(mem.free) // 2**20,
                             uuid=_text(_optional(lib.nvmlDeviceGetUUID, handle) or ""),
                             memory_used_mb=int(mem.used) // 2**20,
                             utilization_pct=int(util.gpu) if util is not None else None,
                             processes=_processes(lib, handle) if processes else ()))
        return Inventory(driver=True, driver_version=version, gpus=found)
    finally:
        _optional(lib.nvmlShutdown)


def detect() -> list[GPU]:
    """Every GPU NVML sees ([] without a driver); NVML is loaded here only, never CUDA."""
    return inventory(processes=False).gpus


@_one_session_at_a_time
def usage(index: int) -> GPU | None:
    """Memory and utilisation of the GPU with NVML index `index` (no process list), or
    None when NVML cannot tell (no driver, no such GPU). What a GPU worker's registry
    heartbeat adds to its record, for `orchestrator watch`."""
    try:
        lib = nvml()
        lib.nvmlInit()
    except Exception:  # binding missing, no driver
        return None
    try:
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        mem = lib.nvmlDeviceGetMemoryInfo(handle)
        util = _optional(lib.nvmlDeviceGetUtilizationRates, handle)
        return GPU(index=index, name=_text(_optional(lib.nvmlDeviceGetName, handle) or ""),
                   memory_total_mb=int(mem.total) // 2**20, memory_free_mb=int(mem.free) // 2**20,
                   memory_used_mb=int(mem.used) // 2**20,
                   utilization_pct=int(util.gpu) if util is not None else None)
    except Exception:
        return None
    finally:
        _optional(lib.nvmlShutdown)
