#!/usr/bin/env python
"""GPU check: run where an NVIDIA GPU is present; prints what it measured.

    python benchmarks/gpu_check.py [--gpu 0] [--packed 4] [--memory-runs 20] [--repeat 2]

1 detection   every GPU NVML sees (as `orchestrator gpus` does), or why there is none.
2 real run    one MLP run on `cuda` through the whole path: a private redis-server, a
              control worker and `orchestrator worker --gpu N`, `orchestrator submit --wait`;
              its metadata.json (device, accuracy, training seconds) and the GPU memory
              NVML saw in use while it trained.
3 isolation   the same worker runs `--memory-runs` runs in all; GPU memory in use on the
              GPU and held by the worker's processes, idle, after 1 run and after all of
              them (each run trains in a fresh pool process that exits: --max-tasks-per-child 1).
4 admission   another process takes all but about 2 GiB of the GPU (a colleague's job); a
              run needing 4 GiB is handed back rather than started, the worker waits, and the
              run trains once that process exits: seconds from its exit to the result.
5 packing     `--packed` K small runs one after another (`resources.gpus: 1`, one worker)
              against the same K runs packed on the GPU (`resources.gpus: 1/K`, K workers on
              the GPU, as `orchestrator workers up --per-gpu K` starts them); wall times from
              submit to the last result, their ratio (goal: 2.5 or more for K=4), and the most
              runs NVML saw on the GPU at once.

Exit status: 0 when every check held, 1 when one did not (or something broke), 2 when
there is no usable GPU here. Every process started here is stopped at the end, also on
errors and Ctrl-C. `--json FILE` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.dispatch import (  # noqa: E402
    BenchmarkError,
    Procs,
    Timed,
    base_env,
    cluster_env,
    log,
    wait_ready,
)
from orchestrator.cluster import gpu  # noqa: E402
from orchestrator.cluster.local import start_redis  # noqa: E402


# -- NVML readings -------------------------------------------------------------------
def used_mb(index: int) -> int:
    found = gpu.usage(index)
    if found is None:
        raise BenchmarkError(f"NVML cannot read GPU {index} any more")
    return found.memory_used_mb


def gpu_processes(index: int) -> list[gpu.GPUProcess]:
    inv = gpu.inventory(processes=True)
    return list(next((g.processes for g in inv.gpus if g.index == index), ()))


def tree_pids(pid: int) -> set[int]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return set()


def held_by(index: int, pids: set[int]) -> int:
    """GPU memory (MiB) NVML reports for these processes; 0 when none is on the GPU."""
    return sum(p.used_memory_mb or 0 for p in gpu_processes(index) if p.pid in pids)


class Sampler:
    """Samples the GPU every `every` seconds in a thread: peak memory in use and the most
    processes on it at once (only processes NVML can list; 0 where it lists none)."""

    def __init__(self, index: int, every: float = 0.1):
        self.index, self.every = index, every
        self.peak_used_mb = 0
        self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_used_mb = max(self.peak_used_mb, used_mb(self.index))
                self.most_processes = max(self.most_processes, len(gpu_processes(self.index)))
            except Exception:  # a sample lost is not a check failed
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- experiments ---------------------------------------------------------------------
def write_experiment(path: Path, name: str, seeds: list[int], gpus: str, epochs: int,
                     memory_gb: float = 1, ranks: int = 1, backend: str = "auto") -> None:
    """Small MLP runs on digits (1797 samples, 64 features, 10 classes), one split each;
    `ranks` > 1: data-parallel (docs/data-parallel.md)."""
    dp = f"  ranks: {ranks}\n  backend: {backend}\n" if (ranks, backend) != (1, "auto") else ""
    path.write_text(
        f"# written by benchmarks/gpu_check.py\n"
        f"experiment: {name}\n"
        f"trainer: mlp\n"
        f"datasets: [digits]\n"
        f"split:\n  validation: 0.25\n"
        f"seeds: {json.dumps(seeds)}\n"
        f"params:\n  hidden: [256, 256]\n  epochs: {epochs}\n  batch_size: 64\n  lr: 0.001\n"
        f"resources:\n  gpus: {gpus}\n  gpu_memory_gb: {memory_gb:g}\n{dp}")


def finished_runs(root: Path, experiment: str) -> list[dict[str, Any]]:
    """metadata.json of every run, with the fold status' attempt history beside it."""
    out = []
    for meta_path in sorted((root / experiment).glob("**/fold_*/metadata.json")):
        meta = json.loads(meta_path.read_text())
        fold = meta_path.parent.name
        status = json.loads((meta_path.parent.parent / "status" / f"{fold}.json").read_text())
        out.append({"meta": meta, "status": status})
    return out


def span(runs: list[dict[str, Any]]) -> tuple[float, int]:
    """Seconds from the first run's start to the last one's end, and the most runs whose
    DONE attempts overlapped in time."""
    spans = []
    for r in runs:
        done = [h for h in r["status"].get("history", []) if h.get("outcome") == "DONE"]
        if done:
            spans.append((float(done[-1]["started_at"]), float(done[-1]["finished_at"])))
    if not spans:
        return 0.0, 0
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = cur = 0
    for _, d in edges:
        cur += d
        most = max(most, cur)
    return max(e for _, e in spans) - min(s for s, _ in spans), most


class Check:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Procs):
        self.args, self.tmp, self.procs = args, tmp, procs
        self.root = tmp / "results"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.url = ""
        self.figures: dict[str, Any] = {}
        self.failures: list[str] = []
        self.processes_listed = False

    def expect(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)

    # -- 1 detection
    def detect(self) -> gpu.GPU | None:
        inv = gpu.inventory(processes=True)
        print("1. detection")
        if not inv.driver:
            print(f"  no NVIDIA driver here: {inv.error}")
            return None
        print(f"  driver {inv.driver_version}, {len(inv.gpus)} GPU(s)")
        for g in inv.gpus:
            print(f"  GPU {g.index}: {g.name}, {g.memory_free_mb} of {g.memory_total_mb} MiB free, "
                  f"utilisation {g.utilization_pct}%, {len(g.processes)} process(es)")
        self.figures["detection"] = {"driver": inv.driver_version, "gpus": [g.to_dict() for g in inv.gpus]}
        return next((g for g in inv.gpus if g.index == self.args.gpu), None)

    # -- cluster
    def start(self) -> None:
        proc, self.url = start_redis(self.tmp / "redis")
        self.procs.add("redis", proc, self.tmp / "redis" / "redis.log")
        self.spawn_worker("control", ["--control"], "control@%h")
        wait_ready(self.url, ["control@"], self.procs, ["control"])

    def spawn_worker(self, name: str, flags: list[str], node: str) -> None:
        argv = [sys.executable, "-m", "orchestrator", "worker", *flags, "--name", node,
                "--loglevel", "INFO"]
        self.procs.spawn(name, argv, cluster_env(self.url, self.root), self.logs / f"{name}.log")

    def gpu_workers(self, count: int, cpu: bool = False) -> list[str]:
        """`count` workers on the GPU (`--cpu`: on the CPU, for a rehearsal without one)."""
        prefix, flags = ("cpu", ["--cpu"]) if cpu else (f"gpu{self.args.gpu}", ["--gpu", str(self.args.gpu)])
        names = [f"{prefix}-{k}" for k in range(count)]
        for n in names:
            self.spawn_worker(n, flags, f"{n}@%h")
        wait_ready(self.url, [f"{n}@" for n in names], self.procs, names)
        return names

    def submit(self, name: str, seeds: list[int], gpus: str, epochs: int,
               memory_gb: float = 1, ranks: int = 1, backend: str = "auto") -> tuple[float, list[dict[str, Any]]]:
        work = self.tmp / name
        work.mkdir()
        write_experiment(work / "exp.yaml", name, seeds, gpus, epochs, memory_gb, ranks, backend)
        argv = [sys.executable, "-m", "orchestrator", "submit", str(work / "exp.yaml"), "--wait",
                "--broker", self.url, "--results-root", str(self.root)]
        t = Timed(argv, base_env(), work / "submit.out", self.args.timeout).run()
        if t.returncode != 0:
            raise BenchmarkError(f"{name}: submit exited {t.returncode}; output ends:\n{t.output()[-3000:]}")
        runs = finished_runs(self.root, name)
        if len(runs) != len(seeds):
            raise BenchmarkError(f"{name}: {len(runs)} runs finished, expected {len(seeds)}")
        return t.elapsed, runs

    def settle(self, workers: list[str], timeout: float = 30.0) -> None:
        """Wait until no process of these workers is on the GPU (the last run's pool
        process has exited), or `timeout`."""
        pids = set().union(*(tree_pids(self.procs.items[w][0].pid) for w in workers))
        deadline = time.monotonic() + timeout
        while held_by(self.args.gpu, pids) and time.monotonic() < deadline:
            time.sleep(0.2)

    # -- 4
    def admission(self, worker: str) -> None:
        import redis

        from orchestrator import keys

        index, need_gb = self.args.gpu, 4
        print(f"4. admission: a run needing {need_gb} GiB while another process holds the GPU")
        free0 = next(g.memory_free_mb for g in gpu.inventory(processes=False).gpus if g.index == index)
        hog = hog_process(index, max(0, free0 - 2048))
        client = redis.Redis.from_url(self.url)
        result: dict[str, Any] = {}
        try:
            free = next(g.memory_free_mb for g in gpu.inventory(processes=False).gpus if g.index == index)
            print(f"  another process took {free0 - free} MiB: {free} MiB left free")
            self.expect(free < need_gb * 1024, f"less than {need_gb} GiB left free")

            def submit() -> None:
                try:
                    result["elapsed"], result["runs"] = self.submit("gpucheck_admission", [7], "1",
                                                                    self.args.epochs, need_gb)
                except BaseException as exc:
                    result["error"] = exc

            thread = threading.Thread(target=submit, daemon=True)
            thread.start()
            raw = wait_for("the worker handing the run back and waiting",
                           lambda: next((client.get(k) for k in client.scan_iter(keys.gpu_wait("*"))), None), 120)
            why = json.loads(raw).get("why", "")
            statuses = list((self.root / "gpucheck_admission").glob("**/status/fold_*.json"))
            started = [p for p in statuses if json.loads(p.read_text()).get("history")]
            print(f"  the worker handed the run back and waits: {why}")
            self.expect(not started, "the run was not started while the memory was missing")
        finally:
            hog.kill()
            hog.wait()
        released = time.monotonic()
        thread.join(self.args.timeout)
        if "error" in result:
            raise result["error"]
        waited = time.monotonic() - released
        [run] = result["runs"]
        history = run["status"].get("history", [])
        print(f"  the other process exited; the run's result came {waited:.1f} s later, "
              f"after {len(history)} attempt(s): {[h.get('outcome') for h in history]}")
        self.expect([h.get("outcome") for h in history] == ["DONE"],
                    "the run trained once, after the memory was free, and never failed")
        self.figures["admission"] = {"free_mb_left": free, "why": why, "seconds_to_result": waited,
                                     "history": history}
        client.close()

    # -- 2, 3
    def run(self) -> None:
        a, index = self.args, self.args.gpu
        baseline = used_mb(index)
        self.start()
        [single] = self.gpu_workers(1)
        pid = self.procs.items[single][0].pid
        idle_used, idle_held = used_mb(index), held_by(index, tree_pids(pid))

        print("2. a real run on cuda")
        with Sampler(index) as s:
            elapsed, runs = self.submit("gpucheck_real", [0], "1", a.epochs)
        meta = runs[0]["meta"]
        acc = float(meta["metrics"].get("accuracy", 0))
        print(f"  device {meta['device']} (GPU {meta.get('gpu')}) on {meta['worker']}: accuracy {acc:.3f}, "
              f"training {meta['training_seconds']:.2f} s, {elapsed:.1f} s from submit to result; "
              f"GPU memory in use peaked at {s.peak_used_mb} MiB (idle {idle_used} MiB)")
        self.expect(meta["device"] == "cuda", "the run trained on cuda")
        self.expect(acc > 0.9, f"accuracy on digits over 0.9 (got {acc:.3f})")
        self.expect(s.peak_used_mb > idle_used, "NVML saw GPU memory in use while it trained")
        # Some virtualised GPUs list no processes through NVML: then the per-process
        # figures below are not available and only the GPU's total is compared.
        self.processes_listed = s.most_processes > 0
        if not self.processes_listed:
            print("  NVML lists no processes on this GPU here: per-process figures are not available")
        try:
            first_op, first_step = cuda_start_seconds(index)
            print(f"  a fresh process needs {first_op:.1f} s to its first CUDA operation and "
                  f"{first_step:.1f} s more to its first optimizer step (paid by every run: each "
                  f"trains in a fresh process)")
            self.figures["cuda_start"] = {"first_op_s": first_op, "first_step_s": first_step}
        except BenchmarkError as exc:
            self.expect(False, str(exc).splitlines()[-1])
        self.figures["real_run"] = {"metadata": meta, "submit_to_result_s": elapsed,
                                    "peak_used_mb": s.peak_used_mb, "idle_used_mb": idle_used}

        print(f"3. isolation: GPU memory after 1 and after {a.memory_runs} runs on one worker")
        self.settle([single])
        after_one, held_one = used_mb(index), held_by(index, tree_pids(pid))
        more = list(range(1, a.memory_runs))
        self.submit("gpucheck_memory", more, "1", max(5, a.epochs // 10))
        self.settle([single])
        after_all, held_all = used_mb(index), held_by(index, tree_pids(pid))
        print(f"  GPU memory in use: {baseline} MiB before any worker, {idle_used} MiB with the idle "
              f"worker, {after_one} MiB after 1 run, {after_all} MiB after {a.memory_runs} runs")
        print(f"  held by the worker's processes: {idle_held} MiB idle, {held_one} MiB after 1 run, "
              f"{held_all} MiB after {a.memory_runs} runs")
        self.expect(after_all - after_one <= a.memory_slack_mb,
                    f"no more GPU memory in use after {a.memory_runs} runs than after 1 "
                    f"(difference {after_all - after_one} MiB, slack {a.memory_slack_mb} MiB)")
        if self.processes_listed:
            self.expect(held_all == 0, "the idle worker holds no GPU memory after its runs")
        self.figures["isolation"] = {"baseline_used_mb": baseline, "idle_used_mb": idle_used,
                                     "after_1_used_mb": after_one, "after_n_used_mb": after_all,
                                     "runs": a.memory_runs, "held_idle_mb": idle_held,
                                     "held_after_1_mb": held_one, "held_after_n_mb": held_all}

        try:
            self.admission(single)
        except BenchmarkError as exc:  # the packing figures are still worth having
            self.expect(False, f"admission: {exc}")

        k = a.packed
        seeds = list(range(100, 100 + k))
        print(f"5. packing: {k} runs one after another, then packed {k} to the GPU")
        seq = []
        for rep in range(a.repeat):
            elapsed, runs = self.submit(f"gpucheck_seq{rep}", seeds, "1", a.epochs)
            busy, overlap = span(runs)
            seq.append({"wall_s": elapsed, "span_s": busy, "overlap": overlap})
            print(f"  one at a time #{rep + 1}: {elapsed:.1f} s from submit to result "
                  f"(runs {busy:.1f} s from first start to last end, at most {overlap} at once)")
        self.procs.stop([single])
        workers = self.gpu_workers(k)
        packed = []
        for rep in range(a.repeat):
            with Sampler(index) as s:
                elapsed, runs = self.submit(f"gpucheck_packed{rep}", seeds, f"{1 / k:g}", a.epochs)
            busy, overlap = span(runs)
            packed.append({"wall_s": elapsed, "span_s": busy, "overlap": overlap,
                           "most_gpu_processes": s.most_processes, "peak_used_mb": s.peak_used_mb})
            print(f"  packed #{rep + 1}: {elapsed:.1f} s from submit to result (runs {busy:.1f} s "
                  f"from first start to last end, at most {overlap} at once; NVML saw up to "
                  f"{s.most_processes} processes, {s.peak_used_mb} MiB in use)")
        self.procs.stop(workers)
        seq_wall = statistics.median(r["wall_s"] for r in seq)
        packed_wall = statistics.median(r["wall_s"] for r in packed)
        ratio = seq_wall / packed_wall
        seq_span = statistics.median(r["span_s"] for r in seq)
        packed_span = statistics.median(r["span_s"] for r in packed)
        print(f"  throughput, packed / one at a time: {ratio:.2f}x by wall time "
              f"(medians {seq_wall:.1f} s / {packed_wall:.1f} s), "
              f"{seq_span / packed_span if packed_span else 0:.2f}x by training span")
        self.expect(max(r["overlap"] for r in seq) == 1, "runs asking for a whole GPU never overlapped")
        self.expect(max(r["overlap"] for r in packed) <= k, f"never more than {k} packed runs at once")
        self.expect(ratio >= a.goal, f"packing {k} small runs gives {a.goal}x the throughput or more")
        self.figures["packing"] = {"k": k, "sequential": seq, "packed": packed, "ratio_wall": ratio,
                                   "ratio_span": seq_span / packed_span if packed_span else None}


CUDA_START = """
import time, torch
t0 = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
t1 = time.perf_counter()
model = torch.nn.Linear(64, 64).cuda()
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(8, 64, device="cuda")).sum().backward()
opt.step()
torch.cuda.synchronize()
print(t1 - t0, time.perf_counter() - t1)
"""


def cuda_start_seconds(index: int) -> tuple[float, float]:
    """Seconds a fresh process (torch already imported) takes to its first CUDA operation,
    and from there to its first optimizer step."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    out = subprocess.run([sys.executable, "-c", CUDA_START], env=env, text=True, capture_output=True,
                         timeout=300)
    if out.returncode != 0:
        raise BenchmarkError(f"the CUDA start-up probe failed:\n{out.stderr[-2000:]}")
    first, step = out.stdout.split()
    return float(first), float(step)


HOG = """
import sys, torch
block = torch.empty(int(sys.argv[1]) * 2**20, dtype=torch.uint8, device="cuda")
print("ready", flush=True)
sys.stdin.read()
"""


def hog_process(index: int, mb: int) -> subprocess.Popen[str]:
    """Another user's process holding `mb` MiB of the GPU until killed."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    proc = subprocess.Popen([sys.executable, "-c", HOG, str(mb)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise BenchmarkError(f"the process meant to take {mb} MiB of GPU {index} did not start")
    return proc


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise BenchmarkError(f"{what}: not seen within {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to check")
    p.add_argument("--packed", type=int, default=4, help="runs packed on the GPU at once (K)")
    p.add_argument("--memory-runs", type=int, default=20, help="runs before memory is read again")
    p.add_argument("--memory-slack-mb", type=int, default=64)
    p.add_argument("--epochs", type=int, default=60, help="epochs of each small run")
    p.add_argument("--repeat", type=int, default=2, help="repetitions of each packing measurement")
    p.add_argument("--goal", type=float, default=2.5)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    if args.packed < 2 or args.memory_runs < 2 or args.repeat < 1:
        p.error("--packed and --memory-runs must be 2 or more, --repeat 1 or more")

    return drive("gpu_check", args, Check, Check.run)


def drive(name: str, args: argparse.Namespace, kind: type[Check], body: Callable[[Any], None],
          need_gpu: bool = True) -> int:
    """Run `body` on a `kind` check in a temporary folder, then stop every process, write
    --json and print the verdict. Exit status: 0 every check held, 1 one did not (or
    something broke), 2 no usable GPU (when `need_gpu`), 130 Ctrl-C."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    procs = Procs()
    check = kind(args, tmp, procs)
    try:
        if need_gpu and check.detect() is None:
            print(f"{name}: no usable GPU {args.gpu} here; run this on a machine with an NVIDIA GPU",
                  file=sys.stderr)
            return 2
        body(check)
    except BenchmarkError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop()
        if args.json:
            args.json.write_text(json.dumps({"figures": check.figures, "failures": check.failures},
                                            indent=2, default=str))
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{name}: " + ("every check held" if not check.failures
                         else f"{len(check.failures)} check(s) failed: " + "; ".join(check.failures)))
    return 0 if not check.failures else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
