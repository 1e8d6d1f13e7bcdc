"""A fork taken while another thread is inside NVML must not hang the child.

A GPU worker's main process queries NVML from its registry heartbeat thread while
Celery forks a fresh training process per run, which queries NVML again (admission).
On a real H100 a training process forked mid-query hung at its first NVML call. The
fake NVML below holds its own lock for the length of a call, as pynvml does.
"""

from __future__ import annotations

import os
import signal
import threading
from types import SimpleNamespace

import pytest

from orchestrator.cluster import gpu


class SlowNVML:
    """pynvml's API subset `gpu.usage` calls; the parent's memory query holds the
    library lock until `gate` opens."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = threading.Event()
        self.gate = threading.Event()
        self.parent = os.getpid()

    def nvmlInit(self) -> None:
        with self.lock:
            pass

    def nvmlShutdown(self) -> None:
        with self.lock:
            pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Slow GPU"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=0, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        with self.lock:
            if os.getpid() == self.parent:
                self.inside.set()
                self.gate.wait(10)
            return SimpleNamespace(total=8 * 2**30, free=6 * 2**30, used=2 * 2**30)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_during_an_nvml_call_can_use_nvml() -> None:
    fake = SlowNVML()
    gpu.use_nvml(fake)
    try:
        results: list[object] = []
        thread = threading.Thread(target=lambda: results.append(gpu.usage(0)))
        thread.start()
        assert fake.inside.wait(5), "the heartbeat-like thread never entered NVML"
        opener = threading.Timer(0.3, fake.gate.set)
        opener.start()
        pid = os.fork()
        if pid == 0:  # the training process: its first NVML call must answer
            signal.alarm(5)  # a hung child dies of SIGALRM instead of hanging the test
            found = gpu.usage(0)
            os._exit(0 if found is not None and found.memory_free_mb == 6 * 1024 else 3)
        _, status = os.waitpid(pid, 0)
        thread.join(5)
        opener.cancel()
        assert not os.WIFSIGNALED(status), (
            f"the forked process hung in NVML (killed by signal {os.WTERMSIG(status)})")
        assert os.WEXITSTATUS(status) == 0
        assert results and results[0] is not None and results[0].memory_used_mb == 2 * 1024
    finally:
        gpu.use_nvml(None)
