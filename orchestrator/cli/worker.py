"""`orchestrator worker`: one Celery worker per device, with this project's settings."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

import click

from .. import errors, keys, settings
from ..cluster import registry
from ..execution import transfer
from .base import cli


def celery_worker_command(gpu: int | None = None, cpu: bool = False, accept_gpu_runs: bool = False,
                          control: bool = False, name: str | None = None, concurrency: int | None = None,
                          loglevel: str = "INFO", exit_when_idle: float | None = None,
                          environ: Mapping[str, str] | None = None,
                          multi_gpus: list[int] | None = None,
                          return_results: bool = False) -> tuple[list[str], dict[str, str]]:
    """The `celery worker` command line and environment for one device and/or `control`."""
    environ = _transfer_env(dict(os.environ if environ is None else environ), return_results, control)
    if multi_gpus:
        return _multi_gpu_command(multi_gpus, name, loglevel, exit_when_idle, environ)
    if gpu is None and not cpu and not control:
        raise errors.OrchestratorError("say what to consume: --gpu N, --cpu and/or --control")
    if gpu is not None and cpu:
        raise errors.OrchestratorError("--gpu and --cpu exclude each other: one worker per device")
    if gpu is not None and gpu < 0:
        raise errors.OrchestratorError(f"--gpu must be a GPU index >= 0 (see `orchestrator gpus`), got {gpu}")
    host = socket.gethostname().split(".")[0]
    queues: list[str] = []
    env = dict(os.environ if environ is None else environ)
    if gpu is not None:
        queues += [f"gpu.{host}.{gpu}", "gpu"]
        # PCI_BUS_ID: CUDA's default order ("fastest first") can differ from NVML's and
        # nvidia-smi's, and then CUDA_VISIBLE_DEVICES=N would select another GPU than N.
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), CUDA_DEVICE_ORDER="PCI_BUS_ID", ORCH_DEVICE="cuda",
                   ORCH_GPU=str(gpu), ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
        default_name = f"gpu{gpu}@%h"
    elif cpu:
        queues += ["cpu"] + (["gpu"] if accept_gpu_runs else [])
        env.update(ORCH_DEVICE="cpu", CUDA_VISIBLE_DEVICES="", ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
        env.pop("ORCH_GPU", None)
        default_name = "cpu@%h"
    else:
        default_name = "control@%h"
        env["ORCH_PRELOAD"] = "0"  # callbacks never train: no torch import here
        env.pop("ORCH_GPU", None)
    if control:
        queues.append("control")
    # Stopping a worker on purpose (SIGTERM: systemd, `workers down`, Ctrl-C of `run`)
    # hands its running run back at once: a cold shutdown requeues the unacknowledged
    # message, and the worker revokes its leases as "handed back" (tasks/watchdog.py),
    # instead of a warm shutdown that would wait for a run of hours to end.
    env.setdefault("REMAP_SIGTERM", "SIGQUIT")
    if exit_when_idle is not None:
        env["ORCH_EXIT_WHEN_IDLE"] = f"{exit_when_idle:g}"  # read by tasks/idle.py
    else:
        env.pop("ORCH_EXIT_WHEN_IDLE", None)
    if gpu is not None or cpu:
        # First, the queue only this worker takes: a data-parallel gang that reserved it
        # sends it its rank there (orchestrator.execution.gang).
        queues.insert(0, keys.rank_queue(registry.node_name(name or default_name)))
    procs = concurrency if (concurrency and gpu is None and not cpu) else 1
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", ",".join(queues),
            "-c", str(procs), "-P", "prefork", "-n", name or default_name, "-E",
            "--without-mingle", "--without-gossip", "--loglevel", loglevel]
    if gpu is not None:
        # Isolation: every run trains in a fresh pool process that exits after it, so the
        # CUDA context and every byte of GPU memory it held go back to the driver; a
        # worker that ran 50 runs holds no more GPU memory than one that ran one.
        argv += ["--max-tasks-per-child", "1"]
    return argv, env


def _transfer_env(env: dict[str, str], return_results: bool, control: bool) -> dict[str, str]:
    """ORCH_RESULTS_TRANSFER for the worker (`return` with --return-results), checked: a
    control worker writes what the others return, so it must see the results root."""
    if return_results:
        env["ORCH_RESULTS_TRANSFER"] = transfer.RETURN
    if transfer.results_transfer(env) == transfer.RETURN and control:
        raise errors.OrchestratorError(
            "a control worker cannot return results (--return-results, ORCH_RESULTS_TRANSFER=return): "
            "it writes what the other workers return under the results root, so start it where that "
            "root is mounted, in the default shared mode")
    transfer.return_max_bytes(env)  # a bad ORCH_RETURN_MAX_MB: say so now, not in the worker's log
    return env


def _multi_gpu_command(gpus: list[int], name: str | None, loglevel: str, exit_when_idle: float | None,
                       environ: Mapping[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """A worker for runs over several GPUs of this host (`resources.gpus: 2` and more):
    queue `gpu.multi`; per run it takes free GPUs among `gpus` (shares in Redis, so no
    GPU goes to two whole-GPU runs, also of per-GPU workers) and shows only those."""
    if len(gpus) < 2 or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise errors.OrchestratorError(f"--gpus takes two or more distinct GPU indices like 0,1,2,3, got {gpus}")
    env = dict(os.environ if environ is None else environ)
    listed = ",".join(map(str, gpus))
    env.update(CUDA_VISIBLE_DEVICES=listed, CUDA_DEVICE_ORDER="PCI_BUS_ID", ORCH_DEVICE="cuda",
               ORCH_GPU=listed, ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
    env.setdefault("REMAP_SIGTERM", "SIGQUIT")
    if exit_when_idle is not None:
        env["ORCH_EXIT_WHEN_IDLE"] = f"{exit_when_idle:g}"
    else:
        env.pop("ORCH_EXIT_WHEN_IDLE", None)
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "gpu.multi",
            "-c", "1", "-P", "prefork", "-n", name or f"gpus{'-'.join(map(str, gpus))}@%h", "-E",
            "--without-mingle", "--without-gossip", "--loglevel", loglevel,
            "--max-tasks-per-child", "1"]
    return argv, env


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"give GPU indices like 0,1,2,3, got {value!r}") from None


@cli.command()
@click.option("--gpu", "gpu", type=int, default=None, metavar="N", help="Train on GPU N (sets CUDA_VISIBLE_DEVICES).")
@click.option("--cpu", "cpu", is_flag=True, help="Train on the CPU (queue `cpu`).")
@click.option("--accept-gpu-runs", is_flag=True, help="With --cpu: also take runs from the `gpu` queue (machines without GPUs).")
@click.option("--control", "control", is_flag=True, help="Consume the `control` queue (chord callbacks).")
@click.option("--name", default=None, help="Celery node name [default gpuN@%h, cpu@%h, control@%h].")
@click.option("--concurrency", default=None, type=int, help="Processes (only with --control alone; training is 1 per device).")
@click.option("--exit-when-idle", "exit_when_idle", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Shut down warmly once no task was held and the queues were empty "
              "for SECONDS (nodes borrowed from a batch scheduler).")
@click.option("--gpus", "multi_gpus", default=None, metavar="I,J,...", callback=_gpu_list,
              help="A worker for runs over several GPUs (resources.gpus >= 2) of these GPUs (queue gpu.multi).")
@click.option("--return-results", is_flag=True,
              help="This host does not see the results root: train in a scratch folder and return "
              "each run's files through Redis to the control worker [env ORCH_RESULTS_TRANSFER=return].")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(gpu: int | None, cpu: bool, accept_gpu_runs: bool, control: bool, name: str | None,
           concurrency: int | None, exit_when_idle: float | None, multi_gpus: list[int] | None,
           return_results: bool, loglevel: str) -> None:
    """Start one Celery worker bound to one GPU, the CPU, and/or the control queue.

    \b
    Examples:
      orchestrator worker --gpu 0            # queues gpu.<host>.0 and gpu
      orchestrator worker --cpu --control    # a laptop: CPU runs and callbacks
      orchestrator worker --gpu 0 --exit-when-idle 300   # a batch job: leave when done
      orchestrator worker --gpus 0,1,2,3     # runs with resources.gpus: 2 or 4
      orchestrator worker --gpu 0 --return-results   # a host without the shared results root
    It runs `celery -A tasks worker` with this project's celeryconfig.py.
    """
    if multi_gpus is not None and (gpu is not None or cpu or control):
        raise errors.OrchestratorError("--gpus (a multi-GPU worker) excludes --gpu, --cpu and --control")
    argv, env = celery_worker_command(gpu, cpu, accept_gpu_runs, control, name, concurrency, loglevel,
                                      exit_when_idle, multi_gpus=multi_gpus,
                                      return_results=return_results)
    if gpu is not None or cpu or multi_gpus:  # a training worker: its trainers load, or it never starts
        from ..trainers import registry

        registry()  # TrainerModuleError: a module of ORCH_TRAINER_MODULES that cannot be imported
    sys.stdout.flush()
    if in_process(argv, env):
        # Celery in this process, not a second interpreter that imports it all again (and
        # in a worker `workers up` forks from its supervisor, all of it is loaded already).
        from ..cluster.forkserver import celery_main

        os.environ.clear()
        os.environ.update(env)
        sys.exit(celery_main(argv[argv.index("celery") + 1:]))
    os.execve(sys.executable, argv, env)


def in_process(argv: list[str], env: Mapping[str, str]) -> bool:
    """Whether `orchestrator worker` runs this Celery command in its own process rather
    than exec'ing it: yes, GPU workers too (their CUDA_VISIBLE_DEVICES goes into
    os.environ, and so into the C environment the CUDA runtime reads when the pool
    process that trains initialises it; nothing in this process touches CUDA). Not when
    the pool starts by spawn: each pool process would run this module again."""
    return bool(settings.value("ORCH_POOL_START_METHOD", env) == "fork")
