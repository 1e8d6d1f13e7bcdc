#!/usr/bin/env python
"""Search figures (docs/search.md, issue 17).

    python benchmarks/search.py [--trials 1000] [--part bookkeeping,tpe,asha,resume]

- bookkeeping: a `random` and a `tpe` search of `trials` trials, one fold each, driven by
  the real step (orchestrator.search.engine.step) in this process against a temporary
  results root; its `publish` trains each group at once with the worker's code
  (runner.execute, the near-free `objective` trainer) and finalizes it. The step's own
  time (journal, results, asks, manifest), without that training and finalizing, per
  proposal. Goal: 10 ms or less.
- tpe: TPE against random on the objective trainer's known function (in-process
  proposals, no training): the trials each needs to reach random's best after 200.
  Goal: TPE in a third or fewer.
- asha: ASHA against full budgets on the objective function: the best score found and
  the epochs spent. Goal: the same best within 1% at a third or less of the epochs.
- resume: a cold step (a fresh process, nothing cached) over the journal of a killed
  `trials`-trial search: the time until its new proposals are published. Goal: under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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
        outside = [0.0]

        def publish(experiment: str, plans: list[Any], layout: Any = layout, outside: list[float] = outside) -> None:
            start = time.perf_counter()
            for p in plans:  # the workers' and the control worker's part: not bookkeeping
                for spec in p.todo:
                    execute(spec, layout, worker, 1)
                for specs in groups(p.specs):
                    finalize_group(layout, specs)
            outside[0] += time.perf_counter() - start

        start = time.perf_counter()
        while not step(layout, search.experiment, publish).get("finished"):
            pass
        total = time.perf_counter() - start
        own = total - outside[0]
        print(f"bookkeeping {strategy:6s}: {trials} trials, {own:.2f} s of step time "
              f"= {1000 * own / trials:.2f} ms per proposal (training and finalize: {outside[0]:.1f} s)")


def _simulate(search: Any, score: Any) -> list[tuple[Any, float]]:
    """Proposals to the end, each scored at once (in trial order): [(trial, score)]."""
    from orchestrator.search.engine import propose
    from orchestrator.search.journal import RUNNING, history

    entries: list[dict[str, Any]] = []
    scored = []
    epochs = 0
    while True:
        new = propose(search, history(entries))
        entries += new
        running = [t for t in history(entries).ordered if t.state == RUNNING]
        if not running:
            break
        for t in running:
            value, spent = score(t)
            epochs += spent
            entries.append({"type": "result", "number": t.number, "state": "COMPLETE", "values": [value],
                            "budget": t.budget})
            scored.append((t, value))
    from orchestrator.search.engine import pruned_at_end

    entries += pruned_at_end(search, history(entries))
    return scored + [(None, float(epochs))]


def tpe_vs_random(work: Path) -> None:
    from orchestrator.trainers.objective import expected_score

    def score(t: Any) -> tuple[float, int]:
        return expected_score(t.params["x"], t.params["y"], t.params["kind"], 3), 3

    rnd = _simulate(_search(_config(work, "r200", "random", 200, 4)), score)[:-1]
    target = max(v for _, v in rnd)
    tpe = _simulate(_search(_config(work, "t200", "tpe", 200, 4)), score)[:-1]
    reached = next((i + 1 for i, (_, v) in enumerate(tpe) if v >= target), None)
    print(f"tpe vs random: random's best after 200 trials {target:.4f}; TPE reaches it after "
          f"{reached} trials ({'goal met' if reached and reached <= 200 / 3 else 'goal NOT met'}: "
          f"a third is {200 / 3:.0f}); TPE's best after 200: {max(v for _, v in tpe):.4f}")


def asha_vs_full(work: Path, trials: int = 81) -> None:
    from orchestrator.trainers.objective import expected_score

    def score(t: Any) -> tuple[float, int]:
        budget = t.budget or 27
        return expected_score(t.params["x"], t.params["y"], t.params["kind"], budget), budget

    full = _simulate(_search(_config(work, "full", "random", trials, 4, epochs="epochs: 27, ")), score)
    asha_cfg = _config(work, "asha", "random", trials, 4, extra="  asha: {min_epochs: 1, max_epochs: 27, "
                       "reduction_factor: 3}\n", epochs="")
    asha = _simulate(_search(asha_cfg), score)
    best_full = max(v for t, v in full[:-1])
    best_asha = max(v for t, v in asha[:-1] if t.budget == 27)
    ratio = asha[-1][1] / full[-1][1]
    print(f"asha vs full budgets ({trials} random trials, 27 epochs, eta 3): best {best_asha:.4f} vs "
          f"{best_full:.4f} ({100 * (best_full - best_asha) / best_full:+.2f}% lower) at "
          f"{asha[-1][1]:.0f} vs {full[-1][1]:.0f} epochs ({ratio:.2f} of them); goal: within 1% at "
          f"a third or less: {'met' if best_asha >= 0.99 * best_full and ratio <= 1 / 3 else 'NOT met'}")


def resume(work: Path, trials: int) -> None:
    """A search of `trials` trials killed with its last batch recorded but not published:
    a fresh process's step, until that batch is published."""
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
    code = (f"import time, sys; sys.path.insert(0, {str(REPO)!r}); t0 = time.perf_counter()\n"
            "from orchestrator.paths import Layout\nfrom orchestrator.search.engine import step\n"
            "t1 = time.perf_counter(); seen = []\n"
            f"step(Layout({str(root)!r}), 'bk_random', lambda e, p: seen.append(time.perf_counter()))\n"
            "print(seen[0] - t0 if seen else -1, seen[0] - t1 if seen else -1)")
    times = []
    for _ in range(3):
        journal.write_bytes(killed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        times.append([float(x) for x in out.split()])
    whole, own = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    print(f"resume: a fresh process publishes the lost batch of a {trials}-trial search after {whole:.2f} s "
          f"({own:.2f} s after its imports; median of 3; goal: under 1 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--part", default="bookkeeping,tpe,asha,resume")
    args = ap.parse_args()
    parts = args.part.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "bookkeeping" in parts:
            bookkeeping(work, args.trials)
        if "tpe" in parts:
            tpe_vs_random(work)
        if "asha" in parts:
            asha_vs_full(work)
        if "resume" in parts:
            resume(work, args.trials)


if __name__ == "__main__":
    main()
