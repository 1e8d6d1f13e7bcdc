"""Trainers used only by the tests, registered on workers via ORCH_TRAINER_MODULES."""

from __future__ import annotations

import os
import time

from orchestrator.trainers import Param, TrainContext, Trainer, TrainResult
from orchestrator.trainers.prior import train as prior_train


def _flaky(ctx: TrainContext) -> TrainResult:
    """Raises on the fold named by `fail_fold`; otherwise the prior baseline."""
    if ctx.fold == ctx.params["fail_fold"]:
        raise ValueError(f"deliberate failure on fold {ctx.fold} of {ctx.run_name}")
    return prior_train(ctx)


def _slow(ctx: TrainContext) -> TrainResult:
    """Takes `seconds`, reporting progress every 0.1 s like a training loop, then the
    prior baseline: lets a test interrupt, kill, pause or cancel a running run."""
    seconds = 0.0 if ctx.fold == ctx.params["short_fold"] else float(ctx.params["seconds"])
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        step += 1
        ctx.reporter.report(step=step)
    return prior_train(ctx)


def _pid(ctx: TrainContext) -> TrainResult:
    """Records which process trained it (tests assert where code ran)."""
    result = prior_train(ctx)
    return TrainResult(result.probabilities, result.params_count, {"pid": os.getpid()})


TRAINERS = [
    Trainer("flaky", "1", _flaky, {"fail_fold": Param(-1, "int"), "smoothing": Param(1.0, "float")}),
    Trainer("slow", "1", _slow, {"seconds": Param(1.0, "float", minimum=0.0),
                                 "short_fold": Param(-1, "int"), "smoothing": Param(1.0, "float")}),
    Trainer("pid", "1", _pid, {"smoothing": Param(1.0, "float")}),
]


def _killed(ctx: TrainContext) -> TrainResult:
    """SIGKILLs its own process on `kill_fold`: a segfault or an OOM kill, as a test."""
    import signal

    if ctx.fold == ctx.params["kill_fold"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return prior_train(ctx)


TRAINERS.append(Trainer("killed", "1", _killed, {"kill_fold": Param(-1, "int"), "smoothing": Param(1.0, "float")}))


def _chatty(ctx: TrainContext) -> TrainResult:
    """Prints through Python, the raw file descriptors and a child process; raises on
    `fail_fold`. What `orchestrator logs` must show."""
    import subprocess
    import sys

    print(f"hello from fold {ctx.fold} on stdout")
    print(f"warning from fold {ctx.fold} on stderr", file=sys.stderr)
    os.write(1, f"raw fd write from fold {ctx.fold}\n".encode())
    subprocess.run(["echo", f"child process of fold {ctx.fold}"], check=True)
    if ctx.fold == ctx.params["fail_fold"]:
        raise RuntimeError(f"chatty failure on fold {ctx.fold}")
    return prior_train(ctx)


TRAINERS.append(Trainer("chatty", "1", _chatty, {"fail_fold": Param(-1, "int"), "smoothing": Param(1.0, "float")}))


def _oom(ctx: TrainContext) -> TrainResult:
    """Dies of CUDA out-of-memory when its batch is larger than `fits` (as torch does)."""
    import torch

    if ctx.params["batch_size"] > ctx.params["fits"]:
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (batch_size={ctx.params['batch_size']})")
    return prior_train(ctx)


TRAINERS.append(Trainer("oom", "1", _oom, {"batch_size": Param(64, "int", minimum=1),
                                           "fits": Param(32, "int", minimum=1),
                                           "smoothing": Param(1.0, "float")}))


def _visible(ctx: TrainContext) -> TrainResult:
    """Records which GPUs the run was shown (CUDA_VISIBLE_DEVICES)."""
    result = prior_train(ctx)
    return TrainResult(result.probabilities, result.params_count,
                       {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()})


TRAINERS.append(Trainer("visible", "1", _visible, {"smoothing": Param(1.0, "float")}))


def _bulky(ctx: TrainContext) -> TrainResult:
    """On `bulk_fold`, adds `bulk_kb` KiB of incompressible text to its metadata (outputs
    too large to return through Redis), unless the file `unless` exists."""
    result = prior_train(ctx)
    if ctx.fold != ctx.params["bulk_fold"] or (ctx.params["unless"] and os.path.exists(ctx.params["unless"])):
        return result
    return TrainResult(result.probabilities, result.params_count,
                       {"bulk": os.urandom(ctx.params["bulk_kb"] * 512).hex()})


TRAINERS.append(Trainer("bulky", "1", _bulky, {"bulk_fold": Param(-1, "int"), "bulk_kb": Param(256, "int", minimum=1),
                                               "unless": Param("", "str"), "smoothing": Param(1.0, "float")}))


class _DieWhenWritten:
    """Kills its process when the runner serialises the run's metadata: the last of the
    four output files, so the attempt dies with three files in its staging folder."""

    def __str__(self) -> str:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
        return ""


def _midwrite(ctx: TrainContext) -> TrainResult:
    """On `kill_fold`, unless the file `unless` exists (it is created then): the process
    is SIGKILLed while the fold's outputs are being written (see _DieWhenWritten)."""
    result = prior_train(ctx)
    marker = ctx.params["unless"]
    if ctx.fold != ctx.params["kill_fold"] or (marker and os.path.exists(marker)):
        return result
    if marker:
        with open(marker, "w"):
            pass
    return TrainResult(result.probabilities, result.params_count, {"die": _DieWhenWritten()})


TRAINERS.append(Trainer("midwrite", "1", _midwrite, {"kill_fold": Param(-1, "int"), "unless": Param("", "str"),
                                                     "smoothing": Param(1.0, "float")}))
