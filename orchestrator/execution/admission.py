"""Admission of a run to a GPU: enough free memory (NVML), and a share of the GPU.

- **Memory.** A run states what it needs (`resources.gpu_memory_gb`, default
  ORCH_DEFAULT_GPU_MEMORY_GB = 4, the seeds' ">4 GB free" check). Before a worker
  starts a run on its GPU it asks NVML for the free memory; when it is short (another
  user's process, say), the run is handed back for another GPU and this worker stops
  taking runs until memory frees up (tasks/admission.py watches for that).
- **Shares.** `resources.gpus: 0.25` lets up to four such runs share one GPU at once
  (several workers per GPU: `workers up --per-gpu 4`); `gpus: 1` takes a GPU whole;
  `gpus: 2` and more take that many whole GPUs of one host (a multi-GPU worker,
  `orchestrator worker --gpus 0,1,2,3`, picks free ones and shows only those to the run
  through CUDA_VISIBLE_DEVICES).
  Shares are counted in Redis per host and GPU (`orch:gpushare:<host>:<index>`, run_id
  -> share). An entry whose run has no live lease any more (its worker died) does not
  count, so a crash never keeps a GPU blocked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from .. import keys, settings
from ..experiment.spec import RunSpec

EPSILON = 1e-6


def default_memory_gb() -> float:
    return float(settings.value("ORCH_DEFAULT_GPU_MEMORY_GB"))


@dataclass(frozen=True)
class Need:
    share: float  # of each GPU, 0 < share <= 1
    memory_mb: int  # free memory needed on each GPU
    count: int = 1  # GPUs of one host (`resources.gpus: 2` and more: whole GPUs)

    @classmethod
    def of(cls, spec: RunSpec) -> Need:
        gb = spec.resources.gpu_memory_gb
        memory = default_memory_gb() if gb is None else gb
        gpus = spec.resources.gpus
        return cls(share=min(1.0, gpus), memory_mb=int(memory * 1024),
                   count=int(gpus) if gpus >= 1 else 1)


def _fits(free_mb: int | None, need: Need) -> bool:
    return free_mb is None or free_mb >= need.memory_mb  # unknown (no NVML): admit




# KEYS: the share hashes of the GPUs. ARGV: run_id, share, lease prefix.
# Entries of runs without a live lease are dropped first (their worker died).
_ACQUIRE = """
for i, key in ipairs(KEYS) do
  local entries = redis.call('HGETALL', key)
  local used = 0
  for j = 1, #entries, 2 do
    if redis.call('EXISTS', ARGV[3] .. entries[j]) == 0 then
      redis.call('HDEL', key, entries[j])
    elseif entries[j] ~= ARGV[1] then
      used = used + tonumber(entries[j + 1])
    end
  end
  if used + tonumber(ARGV[2]) > 1.000001 then return 0 end
end
for i, key in ipairs(KEYS) do redis.call('HSET', key, ARGV[1], ARGV[2]) end
return 1
"""


class Shares:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, host: str, indices: list[int], run_id: str, share: float) -> bool:
        shares = [keys.gpu_share(host, i) for i in indices]
        return bool(self._acquire(keys=shares, args=[run_id, repr(share), keys.lease("")]))

    def release(self, host: str, indices: list[int], run_id: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i in indices:
            pipe.hdel(keys.gpu_share(host, i), run_id)
        pipe.execute()

    def take(self, host: str, candidates: list[int], run_key: str, need: Need) -> tuple[list[int], str]:
        """Take `need.count` of the candidate GPUs that have the memory and the share free
        (in index order). Returns (the GPUs taken, "") or ([], why not)."""
        free = free_memory_mb(candidates)
        roomy = [i for i in candidates if _fits(free[i], need)]
        if len(roomy) < need.count:
            short = [f"GPU {i} has {free[i]} MiB free" for i in candidates if i not in roomy]
            return [], (f"{'; '.join(short)}, the run needs {need.memory_mb} MiB on each of "
                        f"{need.count} GPU{'s' if need.count > 1 else ''}")
        taken: list[int] = []
        for i in roomy:
            if self.acquire(host, [i], run_key, need.share):
                taken.append(i)
                if len(taken) == need.count:
                    return taken, ""
        self.release(host, taken, run_key)
        return [], (f"{len(taken)} of the {need.count} GPUs it needs have a free share"
                    if need.count > 1 else "its GPU share is taken by other runs")

    def room(self, host: str, candidates: list[int], need: Need) -> bool:
        """Could `take` succeed now? (What a waiting worker checks, without taking.)"""
        free = free_memory_mb(candidates)
        fits = [i for i in candidates
                if _fits(free[i], need) and self.used(host, i) + need.share <= 1.000001]
        return len(fits) >= need.count

    def used(self, host: str, index: int) -> float:
        raw = cast(dict[bytes, bytes], self.client.hgetall(keys.gpu_share(host, index)))
        live = [k for k in raw if self.client.exists(keys.lease(k.decode()))]
        return sum(float(raw[k]) for k in live)

    # --- a worker that handed a run back waits for its GPU -------------------------
    def start_waiting(self, worker: str, indices: list[int], need: Need, why: str) -> None:
        self.client.set(keys.gpu_wait(worker), json.dumps({
            "gpus": indices, "share": need.share, "memory_mb": need.memory_mb,
            "count": need.count, "why": why, "since": time.time()}), ex=24 * 3600)

    def waiting(self, worker: str) -> dict[str, Any] | None:
        raw = self.client.get(keys.gpu_wait(worker))
        return json.loads(cast(bytes, raw)) if raw else None

    def stop_waiting(self, worker: str) -> None:
        self.client.delete(keys.gpu_wait(worker))


def free_memory_mb(indices: list[int]) -> dict[int, int | None]:
    """NVML's free memory of each GPU (None where NVML cannot tell: no driver)."""
    from ..cluster.gpu import usage

    found: dict[int, int | None] = {}
    for i in indices:
        gpu = usage(i)
        found[i] = None if gpu is None else gpu.memory_free_mb
    return found


def worker_gpus() -> list[int]:
    """NVML indices of this worker's GPUs (ORCH_GPU, set by `orchestrator worker --gpu`)."""
    return list(settings.value("ORCH_GPU") or [])
