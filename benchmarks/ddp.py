#!/usr/bin/env python
"""Data-parallel runs on real workers (gloo on CPU; docs/data-parallel.md).

    python benchmarks/ddp.py [--workers 3] [--epochs 40]

A private redis-server, `--workers` CPU workers and a control worker. Prints:
1. the time from `submit` until every rank of a 2-rank run trains (its gang `training`,
   every rank past step 1), and the whole run's time;
2. the same run with 1 rank (ordinary run), on the same data: its time;
3. a 2-rank run whose rank 1 is SIGKILLed after epoch 12: the time until rank 0 of that
   attempt stopped and until the run trained again (from its checkpoint);
and the `status` screen of the 2-rank run while it trains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import yaml  # noqa: E402

from orchestrator import keys  # noqa: E402
from orchestrator.cluster.local import free_port, spawn, stop_process  # noqa: E402
from orchestrator.experiment.config import load_experiments  # noqa: E402
from orchestrator.experiment.expand import expand  # noqa: E402


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Bench:
    def __init__(self, base: Path, workers: int):
        self.base, self.port = base, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "ORCH_BROKER_URL": self.url,
                    "ORCH_RESULTS_ROOT": str(base / "results"), "ORCH_CHECKPOINT_EVERY": "5"}
        self.client = redis.Redis.from_url(self.url)
        self.procs: list[subprocess.Popen[bytes]] = []
        (base / "logs").mkdir()
        self.procs.append(spawn([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                 "--save", "", "--appendonly", "no", "--dir", str(base)], dict(os.environ),
                                base / "logs" / "redis.log"))
        wait(self.ping, 20, "redis")
        cmd = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "WARNING"]
        for i in range(workers):
            self.procs.append(spawn([*cmd, "--cpu", "--name", f"cpu{i + 1}@%h"], self.env,
                                    base / "logs" / f"cpu{i + 1}.log"))
        self.procs.append(spawn([*cmd, "--control"], self.env, base / "logs" / "control.log"))
        wait(lambda: len(list(self.client.scan_iter("orch:worker:*"))) == workers + 1, 120, "workers")

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=300).stdout

    def done(self, name: str) -> bool:
        st = json.loads(self.cli("status", name, "--json"))
        return all(g["state"] in ("DONE", "FAILED", "CANCELLED") for g in st["group_details"])

    def gang(self, run_key: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(keys.gang(run_key)).items()}

    def ranks(self, run_key: str, attempt: int, world: int) -> list[dict[str, Any]]:
        raw = self.client.mget([keys.rank(run_key, attempt, r) for r in range(world)])
        return [json.loads(v) for v in raw if v]

    def stop(self) -> None:
        for p in self.procs[1:]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs[1:]:
            stop_process(p, grace=15)
        stop_process(self.procs[0])


def experiment(base: Path, name: str, ranks: int, epochs: int) -> tuple[Path, Any]:
    doc = {"experiment": name, "trainer": "mlp", "datasets": ["digits"], "split": {"validation": 0.3},
           "params": {"epochs": epochs, "batch_size": 32, "hidden": [64]}, "retries": 2,
           "resources": {"gpus": 0, "ranks": ranks}}
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, expand(load_experiments([str(path)])[0])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    bench = Bench(base, args.workers)
    try:
        # 1. a 2-rank run: submit -> all ranks train -> DONE
        cfg, run = experiment(base, "dp2", 2, args.epochs)
        t0 = time.monotonic()
        bench.cli("submit", str(cfg))

        def all_training() -> bool:
            g = bench.gang(run.run_key)
            if g.get("state") != "training":
                return False
            rs = bench.ranks(run.run_key, int(g["attempt"]), 2)
            return len(rs) == 2 and all((r.get("step") or 0) >= 1 for r in rs)

        wait(all_training, 120, "all ranks training")
        t_train = time.monotonic() - t0
        screen = bench.cli("status", "dp2")
        wait(lambda: bench.done("dp2"), 300, "dp2 DONE")
        t_two = time.monotonic() - t0
        # 2. the same run, 1 rank
        cfg, _ = experiment(base, "dp1", 1, args.epochs)
        t0 = time.monotonic()
        bench.cli("submit", str(cfg))
        wait(lambda: bench.done("dp1"), 300, "dp1 DONE")
        t_one = time.monotonic() - t0
        # 3. SIGKILL of rank 1 after epoch 12
        cfg, run = experiment(base, "dpk", 2, args.epochs)
        bench.cli("submit", str(cfg))

        def past_12() -> list[dict[str, Any]] | None:
            g = bench.gang(run.run_key)
            rs = bench.ranks(run.run_key, int(g.get("attempt") or 0), 2) if g.get("attempt") else []
            return rs if len(rs) == 2 and all((r.get("step") or 0) >= 12 for r in rs) else None

        rs = wait(past_12, 120, "rank past epoch 12")
        first = int(bench.gang(run.run_key)["attempt"])
        os.kill(int(next(r for r in rs if r["rank"] == 1)["pid"]), signal.SIGKILL)
        t0 = time.monotonic()
        wait(lambda: not bench.client.exists(keys.rank(run.run_key, first, 0)), 60, "rank 0 to stop")
        t_stop = time.monotonic() - t0

        def relaunched() -> bool:
            g = bench.gang(run.run_key)
            return int(g.get("attempt") or 0) > first and g.get("state") in ("training", "done")

        wait(relaunched, 120, "relaunch")
        t_again = time.monotonic() - t0
        wait(lambda: bench.done("dpk"), 300, "dpk DONE")
        meta = next((base / "results").glob("dpk/**/fold_0/metadata.json"))
        resumed = json.loads(meta.read_text())["trainer_info"].get("resumed_from_epoch")
        print(f"workers: {args.workers} CPU (gloo); digits, {args.epochs} epochs, batch 32")
        print(f"2 ranks: submit -> every rank training {t_train:.1f} s; submit -> DONE {t_two:.1f} s")
        print(f"1 rank:  submit -> DONE {t_one:.1f} s")
        print(f"SIGKILL of rank 1: rank 0 stopped after {t_stop:.1f} s, trained again after {t_again:.1f} s "
              f"(resumed from epoch {resumed})")
        print("status while the 2-rank run trained:")
        print(screen)
    finally:
        bench.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
