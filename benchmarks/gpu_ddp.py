#!/usr/bin/env python
"""Data-parallel runs on a GPU (docs/data-parallel.md); prints what it measured.

    python benchmarks/gpu_ddp.py [--gpu 0] [--epochs 40] [--json FILE] [--cpu]

The cluster of benchmarks/gpu_check.py (a private redis-server, a control worker,
`orchestrator worker --gpu N`), with two workers on the one GPU:

A gloo, 2 ranks   the built-in `mlp` trainer on digits, `resources: {gpus: 0.5, ranks: 2,
                  backend: gloo}`: seconds from submit until every rank trains (the gang
                  `training`, every rank's heartbeat past epoch 1; beats come every second)
                  and to the result; the device and ranks in its metadata.json; the most
                  processes NVML saw on the GPU.
B one process     the same run with `ranks: 1, backend: nccl`: an ordinary run (one rank
                  starts no process group); its metrics against the 2-rank run's (the same
                  steps up to float summation order: docs/data-parallel.md says within 1e-3).
C nccl, 1 rank    so NCCL itself is checked apart: the gang's process_group() with backend
                  nccl and world 1 over the Redis store (orchestrator.execution.store), one
                  all-reduce of 4 MiB on cuda; seconds to the process group and through it.

NCCL refuses two ranks on one GPU: with one GPU, 2 ranks use gloo (on CUDA tensors).
Exit status: 0 when every check held, 1 when one did not (or something broke), 2 when
there is no usable GPU. `--cpu` rehearses A and B on two CPU workers (gpus: 0), where
there is no GPU; its figures are not GPU figures. `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dispatch import base_env  # noqa: E402
from benchmarks.gpu_check import Check, Sampler, drive  # noqa: E402
from orchestrator import keys  # noqa: E402


class TrainingSeen:
    """Polls the private Redis in a thread: the time (monotonic) when the only gang in it
    was `training` with every rank's heartbeat past epoch 1."""

    def __init__(self, url: str, world: int):
        import redis

        self.client: Any = redis.Redis.from_url(url)
        self.world = world
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while self.at is None and not self._stop.wait(0.05):
            with contextlib.suppress(Exception):
                if self.training():
                    self.at = time.monotonic()

    def training(self) -> bool:
        for key in self.client.scan_iter(keys.gang("*")):
            g = {k.decode(): v.decode() for k, v in self.client.hgetall(key).items()}
            if g.get("state") != "training":
                continue
            run_key = key.decode().removeprefix(keys.gang(""))
            raw = self.client.mget([keys.rank(run_key, int(g["attempt"]), r) for r in range(self.world)])
            ranks = [json.loads(v) for v in raw if v]
            return len(ranks) == self.world and all((r.get("step") or 0) >= 1 for r in ranks)
        return False

    def __enter__(self) -> TrainingSeen:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()


NCCL_PROBE = """
import sys, time, torch, torch.distributed as dist, redis
from orchestrator.execution.gang import Gang, process_group
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand
run = expand(load_experiments([sys.argv[2]])[0])[0]
t0 = time.perf_counter()
torch.zeros(1, device="cuda")
t1 = time.perf_counter()
with process_group(Gang(redis.Redis.from_url(sys.argv[1]), run, 1), 0, "nccl"):
    t2 = time.perf_counter()
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    print(dist.get_backend(), dist.get_world_size(), float(x.sum()), t1 - t0, t2 - t1, t3 - t2)
"""


class DDPCheck(Check):
    def data_parallel(self) -> None:
        a, cpu = self.args, self.args.cpu
        gpus, world = ("0" if cpu else "0.5"), 2
        self.start()
        workers = self.gpu_workers(world, cpu=cpu)
        print(f"A. {world} ranks, gloo, on {'two CPU workers' if cpu else f'two workers on GPU {a.gpu}'}: "
              f"digits, {a.epochs} epochs, batch 64, resources.gpus {gpus}")
        sampler: contextlib.AbstractContextManager[Sampler | None] = (contextlib.nullcontext() if cpu
                                                                      else Sampler(a.gpu))
        t0 = time.monotonic()
        with TrainingSeen(self.url, world) as seen, sampler as s:
            elapsed, [dp] = self.submit("ddp2", [0], gpus, a.epochs, ranks=world, backend="gloo")
        meta = dp["meta"]
        info = meta.get("trainer_info", {})
        to_training = None if seen.at is None else seen.at - t0
        nvml = "" if s is None else (f"; NVML saw up to {s.most_processes} processes on the GPU, "
                                     f"{s.peak_used_mb} MiB in use")
        print(f"  submit -> every rank training "
              f"{'not seen' if to_training is None else f'{to_training:.1f} s'}; submit -> result {elapsed:.1f} s")
        print(f"  metadata.json: device {meta['device']} (GPU {meta.get('gpu')}) on {meta['worker']}, "
              f"ranks {info.get('ranks')}, backend {info.get('backend')}, training {meta['training_seconds']:.2f} s"
              f"{nvml}")
        self.expect(meta["device"] == ("cpu" if cpu else "cuda"), f"rank 0 trained on {meta['device']}")
        self.expect(info.get("ranks") == world and info.get("backend") == "gloo",
                    f"the run trained with {world} ranks over gloo")
        self.expect(to_training is not None, "every rank was seen training")
        self.expect([h.get("outcome") for h in dp["status"].get("history", [])] == ["DONE"],
                    "it trained once and never failed")

        one_backend = "auto" if cpu else "nccl"  # nccl needs gpus > 0
        print(f"B. the same run in one process (ranks: 1, backend: {one_backend}: an ordinary run)")
        one_s, [one] = self.submit("ddp1", [0], gpus, a.epochs, ranks=1, backend=one_backend)
        m1 = one["meta"]
        print(f"  submit -> result {one_s:.1f} s, training {m1['training_seconds']:.2f} s, device {m1['device']}, "
              f"process group: {'none' if 'ranks' not in m1.get('trainer_info', {}) else m1['trainer_info']}")
        diffs = {k: abs(float(meta["metrics"][k]) - float(v)) for k, v in m1["metrics"].items()
                 if isinstance(v, int | float) and k in meta["metrics"]}
        worst = max(diffs, key=lambda k: diffs[k])
        print(f"  accuracy: {world} ranks {meta['metrics'].get('accuracy'):.4f}, one process "
              f"{m1['metrics'].get('accuracy'):.4f}; largest metric difference {diffs[worst]:.2g} ({worst})")
        self.expect(diffs[worst] <= a.tolerance, f"every metric within {a.tolerance:g} of the one-process run")
        self.figures["ddp"] = {"ranks": world, "backend": "gloo", "gpus": gpus, "epochs": a.epochs,
                               "workers": workers, "submit_to_training_s": to_training,
                               "submit_to_result_s": elapsed, "metadata": meta,
                               "nvml_most_processes": None if s is None else s.most_processes,
                               "nvml_peak_used_mb": None if s is None else s.peak_used_mb}
        self.figures["one_process"] = {"submit_to_result_s": one_s, "metadata": m1, "metric_differences": diffs}
        if not cpu:
            self.nccl(self.tmp / "ddp1" / "exp.yaml")

    def nccl(self, config: Path) -> None:
        print("C. nccl, 1 rank: the gang's process_group() over the Redis store, one all-reduce on cuda")
        env = {**base_env(), "CUDA_VISIBLE_DEVICES": str(self.args.gpu), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        out = subprocess.run([sys.executable, "-c", NCCL_PROBE, self.url, str(config)], env=env, text=True,
                             capture_output=True, timeout=180)
        if out.returncode != 0:
            self.expect(False, f"nccl process group: exit {out.returncode}: {out.stderr.strip()[-1500:]}")
            return
        backend, world, total, cuda_s, init_s, reduce_s = out.stdout.split()[-6:]
        print(f"  backend {backend}, world {world}: first CUDA op {float(cuda_s):.2f} s, process group "
              f"{float(init_s):.2f} s, first all-reduce (4 MiB, NCCL's communicator set up in it) "
              f"{float(reduce_s):.2f} s; sum {float(total):.0f}")
        self.expect(backend == "nccl" and float(total) == float(1 << 20), "NCCL all-reduced on cuda")
        self.figures["nccl"] = {"backend": backend, "world": int(world), "first_cuda_s": float(cuda_s),
                                "process_group_s": float(init_s), "first_all_reduce_s": float(reduce_s)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU")
    p.add_argument("--epochs", type=int, default=40, help="epochs of each run")
    p.add_argument("--tolerance", type=float, default=1e-3, help="metrics: 2 ranks against 1 process")
    p.add_argument("--cpu", action="store_true", help="rehearse on two CPU workers (no GPU needed)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    return drive("gpu_ddp", args, DDPCheck, DDPCheck.data_parallel, need_gpu=not args.cpu)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
