"""`orchestrator worker`: one Celery worker per device, with this project's settings."""

from __future__ import annotations

import os
import socket
import sys

import click

from .. import errors
from .base import cli


@cli.command()
@click.option("--gpu", "gpu", type=int, default=None, metavar="N", help="Train on GPU N (sets CUDA_VISIBLE_DEVICES).")
@click.option("--cpu", "cpu", is_flag=True, help="Train on the CPU (queue `cpu`).")
@click.option("--accept-gpu-runs", is_flag=True, help="With --cpu: also take runs from the `gpu` queue (machines without GPUs).")
@click.option("--control", "control", is_flag=True, help="Consume the `control` queue (chord callbacks).")
@click.option("--name", default=None, help="Celery node name [default gpuN@%h, cpu@%h, control@%h].")
@click.option("--concurrency", default=None, type=int, help="Processes (only with --control alone; training is 1 per device).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(gpu: int | None, cpu: bool, accept_gpu_runs: bool, control: bool, name: str | None,
           concurrency: int | None, loglevel: str) -> None:
    """Start one Celery worker bound to one GPU, the CPU, and/or the control queue.

    \b
    Examples:
      orchestrator worker --gpu 0            # queues gpu.<host>.0 and gpu
      orchestrator worker --cpu --control    # a laptop: CPU runs and callbacks
    It runs `celery -A tasks worker` with this project's celeryconfig.py.
    """
    if sum(x is not None and x is not False for x in (gpu, cpu or None)) == 0 and not control:
        raise errors.OrchestratorError("say what to consume: --gpu N, --cpu and/or --control")
    if gpu is not None and cpu:
        raise errors.OrchestratorError("--gpu and --cpu exclude each other: one worker per device")
    host = socket.gethostname().split(".")[0]
    queues: list[str] = []
    env = dict(os.environ)
    if gpu is not None:
        queues += [f"gpu.{host}.{gpu}", "gpu"]
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), ORCH_DEVICE="cuda", ORCH_GPU=str(gpu),
                   ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
        default_name = f"gpu{gpu}@%h"
    elif cpu:
        queues += ["cpu"] + (["gpu"] if accept_gpu_runs else [])
        env.update(ORCH_DEVICE="cpu", CUDA_VISIBLE_DEVICES="", ORCH_PRELOAD=env.get("ORCH_PRELOAD", "1"))
        default_name = "cpu@%h"
    else:
        default_name = "control@%h"
        env["ORCH_PRELOAD"] = "0"  # callbacks never train: no torch import here
    if control:
        queues.append("control")
    procs = concurrency if (concurrency and gpu is None and not cpu) else 1
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", ",".join(queues),
            "-c", str(procs), "-P", "prefork", "-n", name or default_name, "-E",
            "--without-mingle", "--without-gossip", "--loglevel", loglevel]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)

