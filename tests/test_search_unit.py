"""Search without Redis: the `search:` block's validation (exit 2, key, what is valid),
and the strategies driven through the engine's own `propose` over journal entries, with
results arriving in different orders (determinism) and scored by the objective trainer's
known function (do they find its optimum?)."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import load_experiments
from orchestrator.search.config import SearchConfig
from orchestrator.search.engine import Search, propose, search_of
from orchestrator.search.journal import RUNNING, append, history, read_entries
from orchestrator.trainers.objective import expected_score

from .conftest import run_cli

BASE = {"experiment": "s", "trainer": "objective", "datasets": ["iris"], "folds": 2,
        "resources": {"gpus": 0}}
GOOD = {"strategy": "tpe", "metric": "reported.score", "trials": 10,
        "space": {"x": {"uniform": [-4, 4]}, "y": {"uniform": [-4, 4]}}}

# (id, changes to the search block (None: delete the key), other top-level keys,
#  the key path the message names, part of what it says is valid)
BAD: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("strategy-typo", {"strategy": "tpee"}, {}, "search.strategy", "did you mean 'tpe'"),
    ("unknown-key", {"trails": 5}, {}, "search.trails", "did you mean 'trials'"),
    ("metric-section", {"metric": "oob.accuracy"}, {}, "search.metric", "section oof, ensemble_holdout, reported"),
    ("metric-name", {"metric": "oof.acuracy"}, {}, "search.metric", "accuracy, log_loss, macro_f1"),
    ("direction", {"direction": "up"}, {}, "search.direction", "maximize or minimize"),
    ("trials-zero", {"trials": 0}, {}, "search.trials", "integer from 1 to 100000"),
    ("parallel-text", {"parallel": "four"}, {}, "search.parallel", "integer from 1 to 10000"),
    ("space-unknown-param", {"space": {"z": {"uniform": [0, 1]}}}, {}, "search.space.z", "valid: x, y, kind"),
    ("space-bad-dist", {"space": {"x": {"normal": [0, 1]}}}, {}, "search.space.x", "{uniform: [low, high]}"),
    ("space-out-of-range", {"space": {"x": {"uniform": [-40, 4]}}}, {}, "search.space.x", ">= -10.0"),
    ("space-fixed-too", {}, {"params": {"x": 1.0}}, "search.space.x", "both fixed in 'params' and searched"),
    ("async-cmaes", {"strategy": "cmaes", "mode": "async"}, {}, "search.mode", "generational: use batch"),
    ("nsga2-one-metric", {"strategy": "nsga2"}, {}, "search.metric", "at least two metrics"),
    ("evolution-trials", {"strategy": "evolution"}, {}, "search.trials", "set evolution.population and evolution.generations"),
    ("evolution-elitism", {"strategy": "evolution", "trials": None,
                           "evolution": {"population": 4, "elitism": 4}}, {}, "search.evolution.elitism",
     "below population"),
    ("architecture-not-mlp", {"architecture": {"layers": [1, 2], "width": [8, 16]}}, {},
     "search.architecture", "hidden, activation and dropout params (mlp)"),
    ("asha-bounds", {"asha": {"min_epochs": 9, "max_epochs": 3, "reduction_factor": 3}}, {},
     "search.asha.max_epochs", "above min_epochs"),
    ("asha-with-cmaes", {"strategy": "cmaes", "asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3}},
     {}, "search.asha", "is for random and tpe"),
    ("sweep-and-search", {}, {"sweep": {"grid": {"x": [1.0, 2.0]}}}, "search", "not both"),
    ("no-space", {"space": None}, {}, "search.space", "required"),
]


def _doc(change: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    block = {**GOOD, **change}
    block = {k: v for k, v in block.items() if v is not None}
    return {**BASE, **top, "search": block}


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_search_block_names_its_key_and_what_is_valid(case: Any, tmp_path: Path) -> None:
    _, change, top, key, valid = case
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_doc(change, top)))
    with pytest.raises(ConfigError) as info:
        load_experiments([str(path)])
    found = [p for p in info.value.problems if p.key == key]
    assert found, f"no problem at {key}: {info.value}"
    assert any(valid in p.message for p in found), str(info.value)


def test_bad_search_blocks_exit_2_without_a_traceback(tmp_path: Path) -> None:
    for i, (_, change, top, _, _) in enumerate(BAD):
        doc = _doc(change, top)
        doc["experiment"] = f"s{i}"
        (tmp_path / f"s{i}.yaml").write_text(yaml.safe_dump(doc))
    proc = run_cli("validate", str(tmp_path))
    assert proc.returncode == 2
    for i, (_, _, _, key, _) in enumerate(BAD):
        assert f"s{i}.yaml: {key}:" in proc.stderr, (key, proc.stderr)


def test_a_good_search_block_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    doc = _doc({"space": {"x": {"uniform": [-4, 4]}, "kind": {"choice": ["a", "c"]}}, "parallel": 3}, {})
    path.write_text(yaml.safe_dump(doc))
    (exp,) = load_experiments([str(path)])
    assert exp.search is not None and exp.points == (("base", {}),)
    assert SearchConfig.from_dict(exp.search.to_dict()) == exp.search
    assert exp.search.directions == ("maximize",) and exp.search.parallel == 3


# -- strategies through the engine's proposals ----------------------------------------
def search_for(tmp_path: Path, block: dict[str, Any], trainer: str = "objective") -> Search:
    path = tmp_path / f"s{random.random()}.yaml"
    doc = {**BASE, "trainer": trainer, "search": block}
    path.write_text(yaml.safe_dump(doc))
    (exp,) = load_experiments([str(path)])
    return search_of(exp)


def objective_values(search: Search, params: dict[str, Any]) -> list[float]:
    score = expected_score(params["x"], params["y"], params.get("kind", "c"), 20)
    return [score, abs(params["x"])][: len(search.cfg.metrics)]


def simulate(search: Search, order: int, journal: Path | None = None,
             forget: Any = None) -> list[dict[str, Any]]:
    """Run the search's proposals to the end, finishing trials in an order drawn from
    `order`: some of those in flight at each round, in a shuffled order. Returns each
    trial's params in trial order."""
    rng = random.Random(order)
    entries: list[dict[str, Any]] = []
    for _ in range(10000):
        if forget is not None:
            forget()
        new = propose(search, history(entries))
        entries += new
        running = [t for t in history(entries).ordered if t.state == RUNNING]
        if not running and not new:
            break
        rng.shuffle(running)
        for t in running[: rng.randint(1, len(running))]:
            entries.append({"type": "result", "number": t.number, "state": "COMPLETE",
                            "values": objective_values(search, t.params)})
    if journal is not None:
        append(journal, entries)
    return [t.params for t in history(entries).ordered]


SPACE = {"x": {"uniform": [-4, 4]}, "y": {"uniform": [-4, 4]}, "kind": {"choice": ["a", "b", "c"]}}
STRATEGIES = {
    "random": {"strategy": "random", "trials": 12, "parallel": 4},
    "tpe-batch": {"strategy": "tpe", "trials": 24, "parallel": 4},
    "cmaes": {"strategy": "cmaes", "trials": 16, "parallel": 4},
    "nsga2": {"strategy": "nsga2", "trials": 12, "parallel": 4, "metric": ["reported.score", "reported.ax"],
              "direction": ["maximize", "minimize"]},
    "evolution": {"strategy": "evolution", "evolution": {"population": 6, "generations": 4, "elitism": 1}},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_same_seed_proposes_the_same_points_whatever_order_trials_finish_in(name: str, tmp_path: Path) -> None:
    block = {"metric": "reported.score", "space": SPACE, "seed": 7, **STRATEGIES[name]}
    search = search_for(tmp_path, block)
    runs = [simulate(search, order) for order in (0, 1, 2)]
    assert len(runs[0]) == search.cfg.trials
    assert runs[0] == runs[1] == runs[2]
    # A process that starts cold at every step (a killed control worker, each step in
    # another process) proposes the same as one that kept its study.
    from orchestrator.search import samplers

    cold = simulate(search, 0, forget=samplers.forget)
    assert cold == runs[0]
    other = search_for(tmp_path, {**block, "seed": 8})
    assert simulate(other, 0) != runs[0]  # the seed matters


def test_async_tpe_fills_free_slots_at_once(tmp_path: Path) -> None:
    search = search_for(tmp_path, {"strategy": "tpe", "mode": "async", "trials": 6, "parallel": 3,
                                   "metric": "reported.score", "space": SPACE})
    entries = propose(search, history([]))
    assert [e["number"] for e in entries] == [0, 1, 2]
    entries.append({"type": "result", "number": 1, "state": "COMPLETE", "values": [0.5]})
    more = propose(search, history(entries))
    assert [e["number"] for e in more] == [3]  # one slot came free: one proposal


def best_after(search: Search, n: int) -> float:
    params = simulate(search, 0)[:n]
    return max(expected_score(p["x"], p["y"], p["kind"], 20) for p in params)


def test_tpe_finds_the_known_optimum_and_beats_random(tmp_path: Path) -> None:
    optimum = expected_score(1.0, -2.0, "c", 20)
    block = {"metric": "reported.score", "space": SPACE, "seed": 3}
    tpe = best_after(search_for(tmp_path, {**block, "strategy": "tpe", "trials": 60, "parallel": 4}), 60)
    rnd = best_after(search_for(tmp_path, {**block, "strategy": "random", "trials": 60, "parallel": 4}), 60)
    assert tpe > 0.95 * optimum, (tpe, optimum)
    assert tpe > rnd


def test_evolution_finds_the_optimum_and_keeps_architectures_valid(tmp_path: Path) -> None:
    optimum = expected_score(1.0, -2.0, "c", 20)
    evo = search_for(tmp_path, {"strategy": "evolution", "metric": "reported.score", "space": SPACE, "seed": 1,
                                "evolution": {"population": 10, "generations": 8, "elitism": 2}})
    assert best_after(evo, evo.cfg.trials) > 0.9 * optimum
    arch = search_for(tmp_path, {"strategy": "evolution", "metric": "oof.accuracy", "seed": 2,
                                 "architecture": {"layers": [1, 3], "width": [8, 64],
                                                  "activation": ["relu", "tanh"], "dropout": [0.0, 0.3]},
                                 "space": {"lr": {"loguniform": [0.001, 0.1]}},
                                 "evolution": {"population": 6, "generations": 3}}, trainer="mlp")
    entries: list[dict[str, Any]] = []
    for _ in range(3):
        new = propose(arch, history(entries))
        entries += new
        for e in new:
            if e["type"] == "trial":  # fitness: close to 100 units in all
                entries.append({"type": "result", "number": e["number"], "state": "COMPLETE",
                                "values": [-abs(sum(e["params"]["hidden"]) - 100)]})
    trials = history(entries).ordered
    assert len(trials) == 6 + 2 * 5
    for t in trials:
        hidden = t.params["hidden"]
        assert 1 <= len(hidden) <= 3 and all(8 <= w <= 64 for w in hidden)
        assert t.params["activation"] in ("relu", "tanh") and 0.0 <= t.params["dropout"] <= 0.3
        assert 0.001 <= t.params["lr"] <= 0.1
        assert t.point.startswith("hidden=")
    assert len({len(t.params["hidden"]) for t in trials}) > 1  # variable depth


def test_the_journal_skips_a_torn_last_line_and_cuts_it_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    append(path, [{"type": "trial", "number": 0}])
    with open(path, "ab") as fh:
        fh.write(b'{"type": "tri')  # a kill in the middle of a write
    assert read_entries(path) == [{"type": "trial", "number": 0}]
    append(path, [{"type": "trial", "number": 1}])
    assert read_entries(path) == [{"type": "trial", "number": 0}, {"type": "trial", "number": 1}]
    assert path.read_bytes().count(b"\n") == 2


def test_optuna_is_not_imported_by_validation_or_submit_modules() -> None:
    import subprocess

    code = ("import sys; import orchestrator.cli.running, orchestrator.cli.searching, tasks.search, "
            "orchestrator.search.engine, orchestrator.trainers.objective; "
            "from orchestrator.experiment.config import load_experiments; "
            "print('optuna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert math.isfinite(expected_score(0, 0, "a", 1))


def test_asha_promotes_the_best_third_and_prunes_the_rest(tmp_path: Path) -> None:
    search = search_for(tmp_path, {"strategy": "random", "metric": "reported.score", "trials": 9, "parallel": 3,
                                   "seed": 5, "space": SPACE,
                                   "asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3}})
    from orchestrator.search.engine import best_trials, progress, pruned_at_end

    entries: list[dict[str, Any]] = []
    spent = 0
    for _ in range(1000):
        h = history(entries)
        new = propose(search, h)
        entries += new
        h = history(entries)
        running = [t for t in h.ordered if t.state == RUNNING]
        if not running:
            entries += pruned_at_end(search, h)
            break
        t = running[0]  # one at a time, in trial order
        spent += t.budget or 0
        p = t.params
        entries.append({"type": "result", "number": t.number, "state": "COMPLETE", "budget": t.budget,
                        "values": [expected_score(p["x"], p["y"], p["kind"], t.budget or 0)]})
    h = history(entries)
    state = progress(search, h)
    assert state["finished"] and state["pruned"] >= 5 and state["complete"] >= 1
    full = [t for t in h.ordered if t.state == "COMPLETE"]
    assert all(t.budget == 9 for t in full)
    every = max(expected_score(t.params["x"], t.params["y"], t.params["kind"], 9) for t in h.ordered)
    assert best_trials(search, h, 1)[0].values[0] == pytest.approx(every)  # the best survived
    assert spent < 9 * 9 / 2  # less than half the epochs of training every trial fully
    assert all(t.error and "stopped by ASHA" in t.error for t in h.ordered if t.state == "PRUNED")


# -- the step over a real results root, without Redis (publish trains in-process) -------
def _step_setup(tmp_path: Path, block: dict[str, Any]) -> tuple[Any, Search, Any]:
    from orchestrator.execution.runner import WorkerInfo
    from orchestrator.paths import Layout
    from orchestrator.search.engine import save_search

    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump({**BASE, "experiment": "st", "folds": 2, "params": {"epochs": 2},
                                    "search": block}))
    (exp,) = load_experiments([str(path)])
    layout = Layout(tmp_path / "root")
    search = search_of(exp)
    save_search(layout, search)
    return layout, search, WorkerInfo(name="t@host", device="cpu", gpu=None, host="host")


def test_a_step_killed_after_recording_proposals_publishes_the_same_ones_next(tmp_path: Path) -> None:
    from orchestrator.search.engine import read_history, step

    layout, search, _ = _step_setup(tmp_path, {"strategy": "tpe", "metric": "reported.score", "trials": 8,
                                                "parallel": 4, "space": SPACE})

    def crash(experiment: str, plans: list[Any]) -> None:
        raise KeyboardInterrupt  # killed between the journal write and the broker

    with pytest.raises(KeyboardInterrupt):
        step(layout, "st", crash)
    recorded = read_history(layout, "st").ordered
    assert [t.number for t in recorded] == [0, 1, 2, 3] and not any(t.published for t in recorded)
    published: list[str] = []
    step(layout, "st", lambda e, plans: published.extend(p.first.point for p in plans))
    after = read_history(layout, "st").ordered
    assert [t.point for t in after] == [t.point for t in recorded]  # no new proposal...
    assert published == [t.point for t in recorded] and all(t.published for t in after)  # ...the same ones


def test_a_step_finalizes_a_group_whose_callback_was_lost(tmp_path: Path, monkeypatch: Any) -> None:
    from orchestrator.collect.status import read_group_status
    from orchestrator.execution.runner import execute
    from orchestrator.search.engine import read_history, step

    layout, search, worker = _step_setup(tmp_path, {"strategy": "random", "metric": "reported.score",
                                                     "trials": 2, "parallel": 2, "space": SPACE})

    def train_only(experiment: str, plans: list[Any]) -> None:  # the chord callbacks never come
        for p in plans:
            for spec in p.todo:
                execute(spec, layout, worker, 1)

    step(layout, "st", train_only)
    trials = read_history(layout, "st").ordered
    assert [t.state for t in trials] == ["RUNNING", "RUNNING"]
    first = search.specs(trials[0])[0]
    assert read_group_status(layout, first) is None
    step(layout, "st", train_only)  # too soon: the callback may still come
    assert read_history(layout, "st").count("RUNNING") == 2
    monkeypatch.setenv("ORCH_LEASE_SECONDS", "0.2")  # two lease periods have passed
    import time

    time.sleep(0.5)
    state = step(layout, "st", train_only)
    assert state["finished"] and state["complete"] == 2
    record = read_group_status(layout, first)
    assert record is not None and record["train_status"] == "DONE"
    assert read_history(layout, "st").trials[0].values == [record["metrics"]["reported"]["score"]]
