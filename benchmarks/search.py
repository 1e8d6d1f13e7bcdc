#!/usr/bin/env python
"""Search figures (docs/search.md, issue 17).

    python benchmarks/search.py [--trials 1000]
        [--part bookkeeping,tpe,asha,asha-digits,determinism,resume]

- bookkeeping: a `random` and a `tpe` search of `trials` trials, one fold each, driven by
  the real step (orchestrator.search.engine.step) in this process against a temporary
  results root; its `publish` trains each group at once with the worker's code
  (runner.execute, the near-free `objective` trainer) and finalizes it. The step's own
  time (journal, results, asks, manifest), without that training and finalizing, per
  proposal. Goal: 10 ms or less.
- tpe: TPE against random on the objective trainer's known function (in-process
  proposals, no training): the trials each needs to reach random's best after 200.
  Goal: TPE in a third or fewer.
- asha, asha-digits: ASHA (decided from the reports at the rungs: asha.judge) against
  training every trial to max_epochs, on the objective (81 random trials) and on digits
  with `mlp` (27 random trials, ranked at the rungs by train_loss): the best final score
  and the epochs spent. Each trial is trained once, in this process, to max_epochs and
  its per-epoch reports replayed through the engine's proposals and asha.judge on 4
  lockstep workers (see _replay_asha). Goal: the same best within 1% at
  a third or less of the epochs.
- determinism: `orchestrator run` (local mode) of one batch-mode TPE search with 1, 2
  and 4 workers: the same proposals in the same order.
- resume: a cold step (a fresh process, nothing cached) over the journal of a killed
  `trials`-trial search: the time until its new proposals are published, from the
  process's start and after its imports (numpy and Optuna included, as a control worker
  has them); a `random` search that lost its last batch's publish, and a `tpe` one that
  must rebuild its study and ask. Goal: under 1 s.

    python benchmarks/search.py --part bookkeeping,resume --against /tmp/old [--repeat 5]

measures those parts on this checkout's code and on the code at /tmp/old (e.g. `git
worktree add /tmp/old <commit>`) with this same script, interleaved, and prints the
medians side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The code measured: this checkout, or (compare(), --against) another one, measured by
# this same script.
CODE = Path(os.environ.get("SEARCH_BENCH_CODE") or REPO)
sys.path.insert(0, str(CODE))

SPACE = "{x: {uniform: [-4, 4]}, y: {uniform: [-4, 4]}, kind: {choice: [a, b, c]}}"


def _config(work: Path, name: str, strategy: str, trials: int, parallel: int, extra: str = "",
            epochs: str = "epochs: 3, ") -> Path:
    path = work / f"{name}.yaml"
    path.write_text(f"experiment: {name}\ntrainer: objective\ndatasets: [iris]\nsplit: {{validation: 0.25}}\n"
                    f"holdout: 0\nresources: {{gpus: 0}}\nparams: {{{epochs}noise: 0.01}}\n"
                    f"search:\n  strategy: {strategy}\n  metric: reported.score\n  trials: {trials}\n"
                    f"  parallel: {parallel}\n  seed: 0\n  space: {SPACE}\n{extra}")
    return path


def _search(path: Path) -> Any:
    from orchestrator.experiment.config import load_experiments
    from orchestrator.search.engine import search_of

    return search_of(load_experiments([str(path)])[0])


def bookkeeping(work: Path, trials: int) -> None:
    from orchestrator.collect.finalize import finalize_group
    from orchestrator.execution.runner import WorkerInfo, execute
    from orchestrator.experiment.expand import groups
    from orchestrator.paths import Layout
    from orchestrator.search.engine import save_search, step

    worker = WorkerInfo(name="bench@host", device="cpu", gpu=None, host="host")
    for strategy in ("random", "tpe"):
        root = work / f"root-{strategy}"
        layout = Layout(root)
        search = _search(_config(work, f"bk_{strategy}", strategy, trials, 4))
        save_search(layout, search)
        outside = [0.0, 0.0]  # wall, CPU

        def publish(experiment: str, plans: list[Any], layout: Any = layout, outside: list[float] = outside) -> None:
            start, cpu = time.perf_counter(), time.process_time()
            for p in plans:  # the workers' and the control worker's part: not bookkeeping
                for spec in p.todo:
                    execute(spec, layout, worker, 1)
                for specs in groups(p.specs):
                    finalize_group(layout, specs)
            outside[0] += time.perf_counter() - start
            outside[1] += time.process_time() - cpu

        start, cpu = time.perf_counter(), time.process_time()
        while not step(layout, search.experiment, publish).get("finished"):
            pass
        own = time.perf_counter() - start - outside[0]
        own_cpu = time.process_time() - cpu - outside[1]  # what a loaded machine's waits do not inflate
        print(f"bookkeeping {strategy:6s}: {trials} trials, {own:.2f} s of step time "
              f"= {1000 * own / trials:.2f} ms per proposal, {1000 * own_cpu / trials:.2f} ms of CPU "
              f"(training and finalize: {outside[0]:.1f} s)")


def _simulate(search: Any, score: Any) -> list[tuple[Any, float]]:
    """Proposals to the end, each scored at once (in trial order): [(trial, score)]."""
    from orchestrator.search.engine import propose
    from orchestrator.search.journal import RUNNING, history

    entries: list[dict[str, Any]] = []
    scored = []
    while True:
        new = propose(search, history(entries))
        entries += new
        running = [t for t in history(entries).ordered if t.state == RUNNING]
        if not running:
            return scored
        for t in running:
            value = score(t)
            entries.append({"type": "result", "number": t.number, "state": "COMPLETE", "values": [value]})
            scored.append((t, value))


def tpe_vs_random(work: Path) -> None:
    from orchestrator.trainers.objective import expected_score

    def score(t: Any) -> float:
        return expected_score(t.params["x"], t.params["y"], t.params["kind"], 3)

    rnd = _simulate(_search(_config(work, "r200", "random", 200, 4)), score)
    target = max(v for _, v in rnd)
    tpe = _simulate(_search(_config(work, "t200", "tpe", 200, 4)), score)
    reached = next((i + 1 for i, (_, v) in enumerate(tpe) if v >= target), None)
    print(f"tpe vs random: random's best after 200 trials {target:.4f}; TPE reaches it after "
          f"{reached} trials ({'goal met' if reached and reached <= 200 / 3 else 'goal NOT met'}: "
          f"a third is {200 / 3:.0f}); TPE's best after 200: {max(v for _, v in tpe):.4f}")


def _curves(spec: Any) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Train one run in this process as a worker would (the same trainer, params, data
    and split): (the trainer's report at every epoch, the run's validation scores)."""
    import numpy as np

    from orchestrator.collect.metrics import scores
    from orchestrator.execution.runner import runnable
    from orchestrator.experiment import datasets
    from orchestrator.trainers import Reporter, TrainContext

    trainer, params = runnable(spec, "cpu")
    table = datasets.load(spec.dataset)
    split = datasets.split(table, spec)
    seen: list[dict[str, float]] = []
    reporter = Reporter(on_report=lambda last: seen.append(dict(last)))
    rows = np.concatenate([split.val, split.holdout])
    result = trainer.fn(TrainContext(params=params, device="cpu", seed=spec.seed, fold=spec.fold,
                                     run_name=spec.name, X_train=table.X[split.train], y_train=table.y[split.train],
                                     X_eval=table.X[rows], n_classes=len(table.classes), reporter=reporter))
    n_val = len(split.val)
    return seen, scores(table.y[split.val], np.asarray(result.probabilities)[:n_val])


def _replay_asha(search: Any, trained: Any) -> tuple[dict[int, Any], int, int]:
    """An ASHA search run as the steps run it (engine.propose, asha.judge over rung
    reports), on `parallel` workers in lockstep (each running trial trains one epoch per
    tick, its rung reports judged after the tick, a pruned trial's slot refilled at once).
    `trained(trial)`: (its reports at every epoch, its final value), a run trained once
    to max_epochs: a run's first k epochs are the same whether it is stopped at k or not
    (no schedule depends on the epoch budget). The stop's own delay (a report and a lease
    renewal, about a second on a cluster) is not counted. Returns (trials by number, the
    epochs trained, the ticks)."""
    from orchestrator.search.asha import judge
    from orchestrator.search.engine import propose
    from orchestrator.search.journal import RUNNING, history

    asha = search.cfg.asha
    entries: list[dict[str, Any]] = []
    reports: dict[tuple[str, int], dict[str, float]] = {}
    trained_epochs: dict[int, int] = {}
    spent = ticks = 0
    while True:
        entries += propose(search, history(entries))
        h = history(entries)
        running = [t for t in h.ordered if t.state == RUNNING]
        if not running:
            return h.trials, spent, ticks
        ticks += 1
        for t in running:
            epoch = trained_epochs[t.number] = trained_epochs.get(t.number, 0) + 1
            spent += 1
            seen, _ = trained(t)
            for spec in search.specs(t):
                reports[(spec.run_id, epoch)] = seen[epoch - 1]
        runs = {t.number: [s.run_id for s in search.specs(t)] for t in running}
        ended = {t.number for t in running if trained_epochs[t.number] >= asha.max_epochs}
        entries += judge(search.cfg, h, runs, reports, ended)
        h = history(entries)
        for n in sorted(ended):
            if h.trials[n].state == RUNNING:
                entries.append({"type": "result", "number": n, "state": "COMPLETE", "values": [trained(h.trials[n])[1]],
                                "budget": asha.max_epochs})


def asha_vs_full(work: Path, dataset: str) -> None:
    """ASHA (from the reports at the rungs) against training every trial to max_epochs:
    the same random search (async: trial k is the same point in both), its best trial's
    final score and the epochs each spent."""
    if dataset == "objective":
        trials, max_epochs, metric, rung_metric = 81, 27, "reported.score", ""
        body = _config(work, "a_obj", "random", trials, 4, epochs="")
    else:  # mlp reports train_loss at every epoch; the search ranks by validation accuracy
        trials, max_epochs, metric, rung_metric = 27, 27, "oof.accuracy", ", metric: reported.train_loss"
        body = _digits_config(work, trials)
    final = metric.split(".")
    asha_block = (f"  mode: async\n  asha: {{min_epochs: 1, max_epochs: {max_epochs}, reduction_factor: 3"
                  f"{rung_metric}}}\n")
    path = work / f"asha_{dataset}.yaml"
    path.write_text(body.read_text() + asha_block)
    search = _search(path)
    cache: dict[str, tuple[list[dict[str, float]], float]] = {}

    def trained(t: Any) -> tuple[list[dict[str, float]], float]:
        if t.point not in cache:
            (spec,) = search.specs(t)
            seen, val = _curves(spec)
            cache[t.point] = (seen, seen[-1][final[1]] if final[0] == "reported" else val[final[1]])
        return cache[t.point]

    start = time.perf_counter()
    by_number, spent, ticks = _replay_asha(search, trained)
    complete = [t for t in by_number.values() if t.state == "COMPLETE"]
    pruned = [t for t in by_number.values() if t.state == "PRUNED"]
    best_asha = max(t.values[0] for t in complete)
    # Full budgets: the same trials (async random: trial k's point depends on k only),
    # each trained to max_epochs.
    assert len(cache) <= trials
    full = [trained(t)[1] for t in by_number.values()]
    best_full = max(full)
    total = trials * max_epochs
    ratio = spent / total
    gap = 100 * (best_full - best_asha) / abs(best_full)
    print(f"asha vs full budgets on {dataset} ({trials} random trials, {max_epochs} epochs, reduction factor 3, "
          f"rungs {search.cfg.asha.rungs}, ranked at the rungs by {search.cfg.asha.metric}, 4 workers): "
          f"best {metric} {best_asha:.4f} vs {best_full:.4f} ({gap:+.2f}% lower) at {spent} vs {total} epochs "
          f"({ratio:.2f} of them; {len(pruned)} pruned, {len(complete)} to the end; {ticks} vs "
          f"{-(-trials // 4) * max_epochs} epoch-ticks of 4 workers); goal: within 1% at a third or less: "
          f"{'met' if gap <= 1 and ratio <= 1 / 3 else 'NOT met'} ({time.perf_counter() - start:.0f} s)")


def _digits_config(work: Path, trials: int) -> Path:
    path = work / "digits_base.yaml"
    path.write_text("experiment: asha_digits\ntrainer: mlp\ndatasets: [digits]\nsplit: {validation: 0.25}\n"
                    "holdout: 0\nresources: {gpus: 0}\nparams: {batch_size: 64}\n"
                    f"search:\n  strategy: random\n  metric: oof.accuracy\n  trials: {trials}\n  parallel: 4\n"
                    "  seed: 0\n  space: {lr: {loguniform: [0.00003, 0.3]}, weight_decay: {uniform: [0.0, 0.01]}}\n"
                    "  architecture: {layers: [1, 2], width: [8, 128], activation: [relu, tanh, sigmoid]}\n")
    return path


def determinism(work: Path, asha: bool = False) -> None:
    """`orchestrator run` (local mode: a private Redis, N CPU workers and a control
    worker) of one search with 1, 2 and 4 workers: the proposals (and with ASHA, which
    trials were pruned at which rung), in trial order, must be the same. A batch-mode TPE
    search of 12 trials of 3 epochs of 0-0.1 s; with `asha`, an evolution of 4 x 3
    generations with ASHA (9 epochs of 0.1-0.3 s, rungs 1 and 3; a 0.5 s watchdog and a
    3 s lease, so that decisions land mid-run)."""
    import os

    from orchestrator.paths import Layout
    from orchestrator.search.engine import read_history

    name = "det_asha" if asha else "det"
    if asha:
        path = _config(work, name, "evolution", 0, 4, epochs="", extra=(
            "  asha: {min_epochs: 1, max_epochs: 9, reduction_factor: 3}\n"
            "  evolution: {population: 4, generations: 3, elitism: 1, tournament: 2}\n"))
        text = path.read_text().replace("  trials: 0\n", "").replace("  parallel: 4\n", "")
        path.write_text(text.replace(SPACE, SPACE[:-1] + ", seconds: {uniform: [0.1, 0.3]}}"))
        env = {"ORCH_WATCHDOG_INTERVAL": "0.5", "ORCH_LEASE_SECONDS": "3"}
    else:
        path = _config(work, name, "tpe", 12, 4)
        # Each trial 3 epochs of 0-0.1 s: trials finish in different orders.
        path.write_text(path.read_text().replace(SPACE, SPACE[:-1] + ", seconds: {uniform: [0.0, 0.1]}}"))
        env = {}
    seen = {}
    for n in (1, 2, 4):
        root = work / f"{name}-{n}"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path), "--workers", str(n),
                               "--results-root", str(root)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=600)
        if proc.returncode != 0:
            print(f"determinism: run with {n} workers failed: {proc.stderr[-2000:]}")
            return
        trials = read_history(Layout(root), name).ordered
        seen[n] = [(t.params, t.state, t.budget if t.state == "PRUNED" else None) for t in trials]
        pruned = [(t.number, t.budget) for t in trials if t.state == "PRUNED"]
        print(f"determinism: {'evolution with ASHA' if asha else 'batch TPE'}, {len(trials)} trials, {n} workers: "
              f"{time.perf_counter() - start:.1f} s; first three proposals "
              f"{[{k: v for k, v in p.items() if k != 'seconds'} for p, _, _ in seen[n][:3]]}"
              + (f"; pruned (trial, rung): {pruned}" if asha else ""))
    same = seen[1] == seen[2] == seen[4]
    print(f"determinism: the same {len(seen[1])} proposals{', prunings' if asha else ''} in the same order "
          f"with 1, 2 and 4 workers: {same}")


def _cold_steps(root: Path, experiment: str, journal: Path, killed: bytes, repeat: int = 5) -> tuple[float, float]:
    """A fresh process's step over `killed` (the journal as a kill left it), `repeat`
    times: the medians of (seconds from the process's start, seconds from the end of
    its imports: the engine's, numpy and Optuna, as a control worker has them from its
    start: tasks.preload, after the worker is ready) until the step's first publish."""
    code = (f"import time, sys; sys.path.insert(0, {str(CODE)!r}); t0 = time.perf_counter()\n"
            "from orchestrator.paths import Layout\nfrom orchestrator.search.engine import step\n"
            "import numpy, optuna, orchestrator.search.samplers\n"
            "t1 = time.perf_counter(); seen = []\n"
            f"step(Layout({str(root)!r}), {experiment!r}, lambda e, p: seen.append(time.perf_counter()))\n"
            "print(seen[0] - t0 if seen else -1, seen[0] - t1 if seen else -1)")
    times = []
    for _ in range(repeat):
        journal.write_bytes(killed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        times.append([float(x) for x in out.split()])
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def resume(work: Path, trials: int) -> None:
    """Two searches of `trials` trials, killed, then a fresh process's step (nothing
    cached: it reads the journal, rebuilds what it needs, imports Optuna if it asks),
    until its first publish: a `random` one killed with its last batch recorded but not
    published (the step publishes it); a `tpe` one killed after its last results were
    recorded, before its next proposals (the step rebuilds the study from the journal,
    asks for them, records and publishes them)."""
    from orchestrator.paths import Layout
    from orchestrator.search.engine import save_search, step

    root = work / "root-random"  # from bookkeeping: every trial COMPLETE
    if not root.exists():
        print("resume: run with the bookkeeping part first")
        return
    layout = Layout(root)
    search = _search(_config(work, "bk_random", "random", trials + 4, 4))
    save_search(layout, search)  # extended by 4 trials: the next step proposes and publishes them
    step(layout, search.experiment, lambda e, p: None)  # records the 4, "publishes" nothing... then:
    journal = layout.search_journal(search.experiment)
    lines = journal.read_bytes().splitlines(keepends=True)
    killed = b"".join(lines[:-1])  # ...killed before its `published` entry
    whole, own = _cold_steps(root, "bk_random", journal, killed)
    print(f"resume: a fresh process publishes the lost batch of a {trials}-trial search after {whole:.2f} s "
          f"({own:.2f} s after its imports; median of 5; goal: under 1 s)")

    root = work / "root-tpe"
    layout = Layout(root)
    journal = layout.search_journal("bk_tpe")
    killed = journal.read_bytes()  # every trial's result recorded, nothing proposed since
    save_search(layout, _search(_config(work, "bk_tpe", "tpe", trials + 4, 4)))  # 4 more to propose
    whole, own = _cold_steps(root, "bk_tpe", journal, killed)
    print(f"resume tpe: a fresh process rebuilds the study of a {trials}-trial TPE search, proposes and "
          f"publishes its next batch after {whole:.2f} s ({own:.2f} s after its imports; median of 5; "
          "goal: under 1 s)")


FIGURES = {  # what compare() reads from each part's lines: (label, pattern of one figure)
    "bookkeeping": [("random ms CPU/proposal", r"bookkeeping random: .*?([0-9.]+) ms of CPU"),
                    ("random ms wall/proposal", r"bookkeeping random: .*?= ([0-9.]+) ms per proposal"),
                    ("tpe ms CPU/proposal", r"bookkeeping tpe   : .*?([0-9.]+) ms of CPU"),
                    ("tpe ms wall/proposal", r"bookkeeping tpe   : .*?= ([0-9.]+) ms per proposal")],
    "resume": [("resume s (process start)", r"resume: .*? after ([0-9.]+) s \("),
               ("resume s (after imports)", r"resume: .*? s \(([0-9.]+) s after its imports"),
               ("resume tpe s (process start)", r"resume tpe: .*? after ([0-9.]+) s \("),
               ("resume tpe s (after imports)", r"resume tpe: .*? s \(([0-9.]+) s after its imports")],
}


def compare(against: Path, parts: list[str], trials: int, repeat: int) -> None:
    """The parts in `parts` (bookkeeping, resume) measured by this script `repeat` times
    on this checkout's code and on the code at `against`, interleaved so that both see
    the same load: each figure's median, side by side."""
    import re

    run_parts = ",".join(dict.fromkeys(["bookkeeping", *parts] if "resume" in parts else parts))
    wanted = [f for part in parts for f in FIGURES[part]]
    seen: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for i in range(repeat):
        for label, code in (("before", against), ("after", REPO)):
            proc = subprocess.run([sys.executable, __file__, "--part", run_parts, "--trials", str(trials)],
                                  capture_output=True, text=True, cwd=code,
                                  env={**os.environ, "SEARCH_BENCH_CODE": str(code), "PYTHONPATH": str(code)})
            for name, pattern in wanted:
                if (m := re.search(pattern, proc.stdout)) is not None:
                    seen[label].setdefault(name, []).append(float(m.group(1)))
            print(f"pass {i + 1}/{repeat} {label}: " + ", ".join(f"{k} {v[-1]:g}" for k, v in seen[label].items())
                  + (f" (exit {proc.returncode}: {proc.stderr[-500:]})" if proc.returncode else ""), flush=True)
    print(f"\nmedians of {repeat} interleaved passes, {trials} trials (before: {against}; after: {REPO}):")
    width = max(len(name) for name, _ in wanted)
    for name, _ in wanted:
        cells = [f"{statistics.median(seen[k][name]):8.3f}" if seen[k].get(name) else "       -" for k in seen]
        print(f"  {name:{width}s}  before {cells[0]}  after {cells[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--part", default="bookkeeping,tpe,asha,asha-digits,determinism,determinism-asha,resume")
    ap.add_argument("--against", type=Path, help="another checkout (e.g. a git worktree of an older commit): "
                    "run the bookkeeping and resume parts of both, interleaved, and print medians side by side")
    ap.add_argument("--repeat", type=int, default=5, help="passes of each checkout with --against")
    args = ap.parse_args()
    parts = args.part.split(",")
    if args.against is not None:
        compare(args.against.resolve(), [p for p in parts if p in FIGURES], args.trials, args.repeat)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "bookkeeping" in parts:
            bookkeeping(work, args.trials)
        if "tpe" in parts:
            tpe_vs_random(work)
        if "asha" in parts:
            asha_vs_full(work, "objective")
        if "asha-digits" in parts:
            asha_vs_full(work, "digits")
        if "determinism" in parts:
            determinism(work)
        if "determinism-asha" in parts:
            determinism(work, asha=True)
        if "resume" in parts:
            resume(work, args.trials)


if __name__ == "__main__":
    main()
