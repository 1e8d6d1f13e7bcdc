#!/usr/bin/env python
"""Weights and experience through Redis (orchestrator.roles; docs/roles.md).

    python benchmarks/weights.py [--sizes 10,100,600] [--repeat 3] [--samples 20000]

A private redis-server on loopback. Prints, for each size in MiB, the median time to
publish a version (chunks pipelined, checksums, pointer flipped under a lease token)
and to fetch it (chunks read, every checksum verified); then the throughput of the
experience stream: 4 actor processes adding samples (XADD in batches, under the bound)
and one learner reading and acknowledging them (XREADGROUP + XACK).
Goal on loopback: 100 MiB published in <= 0.3 s and fetched in <= 0.6 s; 600 MiB works.
`raw SET s` / `raw GET s`: the same bytes as one plain SET and GET, measured in the same
run, so that figures taken on a busy machine can be read against what Redis costs there.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import keys  # noqa: E402
from orchestrator.cluster.local import start_redis, stop_process  # noqa: E402
from orchestrator.roles.experience import ExperienceStream  # noqa: E402
from orchestrator.roles.weights import MiB, WeightStore  # noqa: E402


def weights(url: str, sizes: list[int], repeat: int, chunk_mib: int) -> None:
    client = keys.client(url)
    lease = "orch:lease:bench"
    client.set(lease, "tok")
    print(f"{'size':>8} {'publish s':>10} {'fetch s':>10} {'publish MiB/s':>14} {'fetch MiB/s':>12}"
          f" {'raw SET s':>10} {'raw GET s':>10}")
    for size in sizes:
        store = WeightStore(client, f"bench{size}", keep=1, chunk_bytes=chunk_mib * MiB)
        data = os.urandom(size * MiB) if size <= 100 else os.urandom(MiB) * size
        pubs, gets = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            v = store.publish(data, "tok", lease, step=1)
            pubs.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = store.fetch(v)
            gets.append(time.perf_counter() - t)
            assert got is not None and len(got.data) == len(data)
            del got
        store.clear()
        # The same bytes as one plain SET and GET (what Redis itself costs on this machine
        # right now; not possible above 512 MB): the store's own overhead is the difference.
        raw_set = raw_get = float("nan")
        if size < 512:
            sets, gets_raw = [], []
            for _ in range(repeat):
                t = time.perf_counter()
                client.set("bench:raw", data)
                sets.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.get("bench:raw")
                gets_raw.append(time.perf_counter() - t)
            client.delete("bench:raw")
            raw_set, raw_get = statistics.median(sets), statistics.median(gets_raw)
        p, g = statistics.median(pubs), statistics.median(gets)
        print(f"{size:>5} MiB {p:>10.3f} {g:>10.3f} {size / p:>14.0f} {size / g:>12.0f}"
              f" {raw_set:>10.3f} {raw_get:>10.3f}", flush=True)


def _actor(url: str, n: int, batch: int, ready: Any, go: Any) -> None:
    stream = ExperienceStream(keys.client(url), "bench-xp", maxlen=200_000)
    sample = {"b": [0, 1, 2, 0, 1, 2, 0, 0, 1], "m": 1, "z": 1.0}  # a tic-tac-toe sample
    stream.length()  # connected
    ready.release()
    go.wait()
    sent = 0
    while sent < n:
        if stream.add([sample] * batch, wait=30.0):
            sent += batch


def stream_throughput(url: str, samples: int, actors: int = 4, batch: int = 64) -> None:
    client = keys.client(url)
    stream = ExperienceStream(client, "bench-xp", maxlen=200_000)
    stream.reset()
    per = samples // actors
    ctx = mp.get_context("spawn")
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_actor, args=(url, per, batch, ready, go)) for _ in range(actors)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()  # every actor started and connected: the clock starts now
    got = 0
    reader = stream.reader("learner.0")
    t = time.perf_counter()
    go.set()
    while got < per * actors:
        entries = reader.read(count=512, block_ms=1000)
        got += len(entries)
        reader.ack([e.id for e in entries])
    took = time.perf_counter() - t
    for p in procs:
        p.join()
    print(f"stream: {got} samples from {actors} actors to the learner in {took:.2f} s "
          f"({got / took:,.0f} samples/s, read and acknowledged; bound {stream.maxlen})")
    stream.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,600")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--samples", type=int, default=40_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        proc, url = start_redis(Path(tmp) / "redis")
        try:
            weights(url, [int(s) for s in args.sizes.split(",")], args.repeat, args.chunk_mib)
            stream_throughput(url, args.samples)
        finally:
            stop_process(proc)


if __name__ == "__main__":
    main()
