"""The worker registry in Redis: who is up, where, doing what.

After seed 003's `workers:*` keys with a TTL: the main process of every worker writes
`orch:worker:<node name>` (one JSON value) every HEARTBEAT seconds with a lifetime of
three heartbeats (tasks/fleet.py). A worker that stops cleanly deletes its key; one that
dies (SIGKILL, host lost) drops out when the key expires. Readers never have to guess
from timestamps whether a worker is alive. The supervisor behind `workers up` is
orchestrator.cluster.supervisor.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, cast

import redis

from .. import keys, settings
from . import gpu

# orch:active is written by the worker that trains a run (run leases), read here for
# "current run": field = run_key, value = JSON with at least "worker", "name",
# "experiment", "started".
DEFAULT_HEARTBEAT_SECONDS = 5.0
TTL_HEARTBEATS = 3  # a record outlives two missed heartbeats, not three


def heartbeat_seconds() -> float:
    """Seconds between registry writes (ORCH_WORKER_HEARTBEAT, default 5)."""
    return float(settings.value("ORCH_WORKER_HEARTBEAT"))


def record_ttl(interval: float) -> int:
    return max(1, math.ceil(interval * TTL_HEARTBEATS))


class WorkerState(str, Enum):
    IDLE = "idle"  # consuming, no run in hand
    BUSY = "busy"  # at least one task reserved or running
    STOPPING = "stopping"  # shutting down: takes nothing new


@dataclass
class WorkerRecord:
    """What a worker says about itself in the registry."""

    name: str  # Celery node name, e.g. gpu0@host
    host: str
    pid: int  # the worker's main process
    gpu: int | None  # NVML index of its GPU, None for CPU and control workers
    device: str  # cuda | cpu | control
    queues: list[str]
    state: str
    started: float  # unix time
    heartbeat: float  # unix time of the last write
    active: int = 0  # tasks reserved or running
    exit_when_idle: float | None = None
    # GPU workers: their GPU as NVML saw it at the last heartbeat (None: unknown, or an
    # older worker that does not report it).
    gpu_memory_used_mb: int | None = None
    gpu_memory_total_mb: int | None = None
    gpu_utilization: int | None = None  # percent

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        data = json.loads(raw)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)



def register(client: redis.Redis, record: WorkerRecord, ttl: int) -> None:
    client.set(keys.worker(record.name), record.to_json(), ex=ttl)


def unregister(client: redis.Redis, name: str, pid: int) -> bool:
    """Delete `name`'s record if it is still this process's (not a restarted successor's)."""
    key = keys.worker(name)
    with client.pipeline() as pipe:
        try:
            pipe.watch(key)
            raw = pipe.get(key)
            if raw is None or WorkerRecord.from_json(cast(bytes, raw)).pid != pid:
                return False
            pipe.multi()
            pipe.delete(key)
            pipe.execute()
            return True
        except redis.WatchError:
            return False


def list_workers(client: redis.Redis) -> list[WorkerRecord]:
    """Every worker whose record has not expired, sorted by host and name."""
    names = sorted(client.scan_iter(match=f"{keys.WORKER_PREFIX}*", count=1000))
    if not names:
        return []
    records = []
    for raw in cast(list[bytes | None], client.mget(names)):
        if raw is None:  # expired between SCAN and MGET
            continue
        with contextlib.suppress(ValueError, TypeError):
            records.append(WorkerRecord.from_json(raw))
    return sorted(records, key=lambda r: (r.host, r.name))


def current_runs(client: redis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Worker node name -> the runs it holds now, from the run leases' `orch:active`."""
    by_worker: dict[str, list[dict[str, Any]]] = {}
    raw = cast(dict[bytes, bytes], client.hgetall(keys.ACTIVE))
    for run_id, value in raw.items():
        try:
            info = json.loads(value)
        except ValueError:
            continue
        if not isinstance(info, dict) or info.get("revoked_token") is not None or \
                ("token" in info and info["token"] is None):
            continue  # an attempt the watchdog revoked or that was handed back: not current
        if isinstance(info.get("worker"), str):
            by_worker.setdefault(info["worker"], []).append({"run_id": run_id.decode(), **info})
    return by_worker


def this_host() -> str:
    """The host part of this host's node names (Celery's %h)."""
    return socket.gethostname()


def node_name(template: str) -> str:
    return template.replace("%h", this_host())


# --- helpers for the commands ------------------------------------------------------

def state_url(broker: str) -> str:
    """Where the registry lives: the live-state Redis, as the workers compute it."""
    return os.environ.get("ORCH_STATE_URL") or os.environ.get("ORCH_RESULT_BACKEND") or broker


def client(url: str) -> redis.Redis:
    return keys.client(url, "command")


def redact(url: str) -> str:
    """A Redis URL fit to print: the password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def gpu_owners(gpu_index: int, records: list[WorkerRecord], host: str | None = None) -> list[str]:
    """Node names of this host's workers bound to GPU `gpu_index`."""
    host = host or this_host()
    return [r.name for r in records if r.host == host and r.gpu == gpu_index]


def process_owner(pid: int, records: list[WorkerRecord], host: str | None = None) -> str | None:
    """The worker of this host whose main process is `pid` or one of its ancestors."""
    import psutil

    host = host or this_host()
    mains = {r.pid: r.name for r in records if r.host == host}
    try:
        proc = psutil.Process(pid)
        chain = [proc, *proc.parents()]
    except psutil.Error:
        return None
    return next((mains[p.pid] for p in chain if p.pid in mains), None)

# --- what a worker says about itself (tasks/fleet.py writes it) ----------------------

def worker_device(queues: list[str]) -> str:
    """control, cuda or cpu: what the worker consuming `queues` trains on."""
    if queues == ["control"]:
        return "control"
    if (device := settings.value("ORCH_DEVICE")) is not None:
        return str(device)
    return "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"


def worker_gpu() -> int | None:
    """The NVML index of a one-GPU worker (ORCH_GPU), else None."""
    gpus = settings.value("ORCH_GPU") or []
    return gpus[0] if len(gpus) == 1 else None


def exit_when_idle() -> float | None:
    """ORCH_EXIT_WHEN_IDLE: seconds with nothing to do before the worker exits, or None."""
    found = settings.value("ORCH_EXIT_WHEN_IDLE")
    return None if found is None else float(found)


def add_gpu_usage(record: WorkerRecord) -> None:
    """A GPU worker's record gets its GPU's memory in use and utilisation, through NVML
    (never CUDA: this is the main process, which forks the training processes)."""
    if record.gpu is None:
        return
    found = gpu.usage(record.gpu)
    record.gpu_memory_used_mb = found.memory_used_mb if found else None
    record.gpu_memory_total_mb = found.memory_total_mb if found else None
    record.gpu_utilization = found.utilization_pct if found else None
