"""Search without Redis: the `search:` block's validation (exit 2, key, what is valid),
and the strategies driven through the engine's own `propose` over journal entries, with
results arriving in different orders (determinism) and scored by the objective trainer's
known function (do they find its optimum?)."""

from __future__ import annotations

import dataclasses
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
    ("asha-eta", {"asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 1}}, {},
     "search.asha.reduction_factor", "integer >= 2"),
    ("asha-unknown-key", {"asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3, "eta": 3}}, {},
     "search.asha", "min_epochs, max_epochs, reduction_factor, metric"),
    ("asha-needs-a-reported-metric", {"metric": "oof.accuracy",
                                      "asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3}}, {},
     "search.asha.metric", "required when search.metric is not a reported value"),
    ("asha-metric-not-reported", {"asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3,
                                           "metric": "oof.accuracy"}}, {}, "search.asha.metric", "reported.<name>"),
    ("asha-sets-epochs", {"asha": {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3}},
     {"params": {"epochs": 5}}, "search.asha", "sets `epochs` itself"),
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


ASHA = {"min_epochs": 1, "max_epochs": 9, "reduction_factor": 3}


def simulate_asha(search: Search, order: int, forget: Any = None) -> tuple[list[dict[str, Any]], int]:
    """An ASHA search to the end, as the steps and workers run it, without Redis: each
    trial one run per fold training epoch by epoch, the runs advanced in an order drawn
    from `order`, their reports at the rungs judged (asha.judge) after every epoch, a
    pruned trial's runs stopped at once. Scores: the objective's known function.
    Returns (the journal's entries, the epochs trained)."""
    from orchestrator.search.asha import judge

    assert search.cfg.asha is not None
    rng = random.Random(order)
    entries: list[dict[str, Any]] = []
    reports: dict[tuple[str, int], dict[str, float]] = {}
    epoch_of: dict[str, int] = {}  # run_id -> epochs trained
    spent = 0
    for _ in range(100_000):
        if forget is not None:
            forget()
        entries += propose(search, history(entries))
        h = history(entries)
        running = {t.number: [s.run_id for s in search.specs(t)] for t in h.ordered if t.state == RUNNING}
        if not running:
            break
        number = rng.choice(sorted(running))
        todo = [r for r in running[number] if epoch_of.get(r, 0) < search.cfg.asha.max_epochs]
        if todo:
            run_id = rng.choice(todo)
            epoch_of[run_id] = epoch = epoch_of.get(run_id, 0) + 1
            spent += 1
            p = h.trials[number].params
            reports[(run_id, epoch)] = {"score": expected_score(p["x"], p["y"], p["kind"], epoch)}
        ended = {n for n, runs in running.items()
                 if all(epoch_of.get(r, 0) >= search.cfg.asha.max_epochs for r in runs)}
        entries += judge(search.cfg, h, running, reports, ended)
        for n in sorted(ended):
            if h.trials[n].state == RUNNING:
                p = h.trials[n].params
                entries.append({"type": "result", "number": n, "state": "COMPLETE", "budget": 9,
                                "values": objective_values(search, p)})
    return entries, spent


def test_asha_prunes_from_the_reports_at_the_rungs_and_keeps_the_best(tmp_path: Path) -> None:
    from orchestrator.search.engine import best_trials, progress

    search = search_for(tmp_path, {"strategy": "random", "metric": "reported.score", "trials": 27, "parallel": 3,
                                   "seed": 5, "space": SPACE, "asha": ASHA})
    assert search.cfg.asha is not None and search.cfg.asha.rungs == [1, 3]
    assert all(s.report_at == (1, 3) and s.params["epochs"] == 9 for t in history(propose(search, history([]))).ordered
               for s in search.specs(t))
    entries, spent = simulate_asha(search, 0)
    h = history(entries)
    state = progress(search, h)
    assert state["finished"] and state["pruned"] >= 14 and state["complete"] >= 1
    for t in h.ordered:
        if t.state == "PRUNED":  # recorded with its rung and value, and stopped there
            assert t.budget in (1, 3) and t.error and f"pruned by ASHA at epoch {t.budget}" in t.error
            assert max(t.rungs) == t.budget
        else:
            assert t.state == "COMPLETE" and t.budget == 9 and sorted(t.rungs) == [1, 3]
    every = max(expected_score(t.params["x"], t.params["y"], t.params["kind"], 20) for t in h.ordered)
    best = best_trials(search, h, 1)[0]
    assert best.values and best.values[0] == pytest.approx(every)  # the best went on to the end
    full = 27 * 2 * 9  # 27 trials, 2 folds, 9 epochs
    assert spent < full / 2, (spent, full)  # benchmarks/search.py measures it at scale
    # A decision is a function of the journal: the same order of reports, the same search.
    def timeless(es: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "t"} for e in es]

    assert timeless(simulate_asha(search, 0)[0]) == timeless(entries)


def test_asha_goes_on_only_in_the_top_third_of_a_rung() -> None:
    from orchestrator.search.asha import goes_on

    assert goes_on(0.5, [0.5], 3, True)  # the first at a rung
    assert not goes_on(0.4, [0.5, 0.4], 3, True)  # fewer than eta: only the best so far
    assert goes_on(0.6, [0.5, 0.4, 0.6], 3, True)
    assert goes_on(0.5, [0.7, 0.6, 0.5, 0.4, 0.3, 0.2], 3, True) is False  # top 2 of 6
    assert goes_on(0.6, [0.7, 0.6, 0.5, 0.4, 0.3, 0.2], 3, True)
    assert goes_on(0.2, [0.7, 0.6, 0.5, 0.4, 0.3, 0.2], 3, False)  # minimize


@pytest.mark.parametrize("name", ["tpe", "tpe-batch", "cmaes", "evolution", "nsga2"])
def test_asha_goes_on_top_of_every_strategy(name: str, tmp_path: Path) -> None:
    """Pruned trials are told to the strategy (tpe: PRUNED with their last rung value;
    cmaes and evolution: that value as their result; nsga2: failed), the search ends,
    and a process that starts cold at every step proposes what one that kept its study
    does."""
    from orchestrator.search import samplers
    from orchestrator.search.asha import told

    block = {"metric": "reported.score", "space": SPACE, "seed": 7, "asha": ASHA, **STRATEGIES.get(name, {})}
    if name.startswith("tpe"):
        block.update(strategy="tpe", trials=24, parallel=4, mode=name.removeprefix("tpe-") if "-" in name else "async")
    search = search_for(tmp_path, block)
    entries, _ = simulate_asha(search, 1)
    h = history(entries)
    assert len(h.trials) == search.cfg.trials and h.count("RUNNING") == 0
    pruned = [t for t in h.ordered if t.state == "PRUNED"]
    assert pruned and h.count("COMPLETE")
    state, values = told(search.cfg, pruned[0])
    last = [pruned[0].rungs[pruned[0].budget or 0]]
    expected = {"tpe": ("PRUNED", last), "tpe-batch": ("PRUNED", last), "nsga2": ("FAILED", None)}
    assert (state, values) == expected.get(name, ("COMPLETE", last))
    cold, _ = simulate_asha(search, 1, forget=samplers.forget)
    assert [e.get("params") for e in cold] == [e.get("params") for e in entries]
    if search.cfg.mode == "batch":  # the same pruning and proposals whatever order runs report in
        for order in (2, 3):
            other = history(simulate_asha(search, order)[0])
            assert [(t.params, t.state, t.rungs) for t in other.ordered] == \
                [(t.params, t.state, t.rungs) for t in h.ordered]


def test_report_at_travels_in_the_message_only_when_set(tmp_path: Path) -> None:
    from orchestrator.errors import InvalidSpecError
    from orchestrator.experiment.spec import RunSpec

    search = search_for(tmp_path, {**GOOD, "trials": 1})
    spec = search.specs(history(propose(search, history([]))).ordered[0])[0]
    assert "report_at" not in spec.to_dict()
    with_rungs = dataclasses.replace(spec, report_at=(1, 3))
    data = with_rungs.to_dict()
    assert data["report_at"] == [1, 3] and RunSpec.from_dict(data) == with_rungs
    assert with_rungs.run_id == spec.run_id  # not part of the run's identity
    for bad in ([3, 1], [0], ["1"], list(range(1, 100)), {"a": 1}):
        with pytest.raises(InvalidSpecError, match="report_at"):
            RunSpec.from_dict({**data, "report_at": bad})


# -- the step over a real results root, without Redis (publish trains in-process) -------
def _step_setup(tmp_path: Path, block: dict[str, Any],
                params: dict[str, Any] | None = None) -> tuple[Any, Search, Any]:
    from orchestrator.execution.runner import WorkerInfo
    from orchestrator.paths import Layout
    from orchestrator.search.engine import save_search

    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump({**BASE, "experiment": "st", "folds": 2,
                                    "params": {"epochs": 2} if params is None else params,
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


class _FakeRedis:
    """What rungs.sender and rungs.read use of a Redis client."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    def pipeline(self, transaction: bool = False) -> _FakeRedis:
        return self

    def hset(self, key: str, field: str, value: str) -> None:
        self.hashes.setdefault(key, {})[field.encode()] = value.encode()

    def expire(self, key: str, ttl: int) -> None:
        pass

    def execute(self) -> None:
        pass

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))


def test_rung_reports_are_sent_at_the_rungs_only_and_read_back_checked(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from orchestrator.search import rungs

    search = search_for(tmp_path, {**GOOD, "trials": 1, "asha": ASHA})
    spec = search.specs(history(propose(search, history([]))).ordered[0])[0]
    live = SimpleNamespace(client=_FakeRedis())
    nudged: list[str] = []
    send = rungs.sender(live, spec, nudge=nudged.append)
    for epoch in range(1, 10):
        send({"epoch": epoch, "score": epoch / 10, "note": "text", "flag": True, "bad": float("nan")})
    send({"epoch": "3", "score": 1.0})  # not an epoch number: ignored
    key = f"orch:rungs:{spec.experiment}"
    assert nudged == [spec.experiment] * 2  # a step asked for at each rung
    assert sorted(live.client.hashes[key]) == [f"{spec.run_id}:1".encode(), f"{spec.run_id}:3".encode()]
    live.client.hashes[key][b"../../etc:1"] = b'{"score": 1}'  # forged or broken entries
    live.client.hashes[key][b"0123456789abcdef:2"] = b"not json"
    live.client.hashes[key][b"0123456789abcdef:4"] = b'["a list"]'
    assert rungs.read(live, spec.experiment) == {(spec.run_id, 1): {"epoch": 1.0, "score": 0.1},
                                                 (spec.run_id, 3): {"epoch": 3.0, "score": 0.3}}


def test_an_asha_step_killed_before_stopping_a_pruned_trial_stops_it_at_the_next_step(
        tmp_path: Path, monkeypatch: Any) -> None:
    """The PRUNED result is durable before the runs are told to stop; a step killed in
    between (here: the stop raises) leaves the trial PRUNED, and the next step stops its
    runs and records `stopped`; later steps do not stop them again."""
    from orchestrator.search import engine
    from orchestrator.search.engine import read_history, step

    layout, search, _ = _step_setup(tmp_path, {"strategy": "random", "metric": "reported.score", "trials": 2,
                                               "parallel": 2, "space": SPACE, "asha": ASHA}, params={})
    step(layout, "st", lambda e, plans: None)  # both trials published, nothing trains here
    trials = read_history(layout, "st").ordered
    assert [t.published for t in trials] == [True, True]
    reports = {(s.run_id, 1): {"score": 0.5 - 0.1 * t.number} for t in trials for s in search.specs(t)}
    monkeypatch.setattr(engine.rungs, "read", lambda live, experiment: reports)
    stopped: list[list[str]] = []

    def killed(layout: Any, live: Any, specs: list[Any], why: str) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.prune, "stop", killed)
    with pytest.raises(KeyboardInterrupt):
        step(layout, "st", lambda e, plans: None, live=object())
    h = read_history(layout, "st")
    assert h.trials[0].state == "RUNNING" and h.trials[0].rungs == {1: 0.5}
    assert h.trials[1].state == "PRUNED" and not h.trials[1].stopped and h.trials[1].rungs == {1: 0.4}
    assert "pruned by ASHA at epoch 1: reported.score 0.4 is not in the top 1/3 of the 2" in (h.trials[1].error or "")

    monkeypatch.setattr(engine.prune, "stop",
                        lambda layout, live, specs, why: stopped.append([s.run_id for s in specs]) or 0)
    step(layout, "st", lambda e, plans: None, live=object())
    assert stopped == [[s.run_id for s in search.specs(h.trials[1])]]
    assert read_history(layout, "st").trials[1].stopped
    step(layout, "st", lambda e, plans: None, live=object())
    assert len(stopped) == 1  # idempotent: stopped once
    assert len([e for e in read_entries(layout.search_journal("st")) if e["type"] == "rung"]) == 2  # judged once


def test_the_status_and_watch_line_shows_trials_pruned_the_generation_and_the_best(tmp_path: Path) -> None:
    """What `status` prints and `watch` shows of a search (views.search.status_line over
    search_status, as the dashboard's snapshot calls it): trials ended of all, complete,
    failed, pruned and running ones, the generation, and the best so far."""
    from orchestrator.views.search import search_status, status_line

    layout, search, _ = _step_setup(tmp_path, {"strategy": "random", "metric": "reported.score", "trials": 5,
                                                "parallel": 4, "seed": 1, "space": SPACE})
    entries = propose(search, history([]))
    entries += [{"type": "result", "number": 0, "state": "COMPLETE", "values": [0.25]},
                {"type": "result", "number": 1, "state": "COMPLETE", "values": [0.75]},
                {"type": "result", "number": 2, "state": "PRUNED", "values": [0.1], "error": "pruned by ASHA"},
                {"type": "result", "number": 3, "state": "FAILED", "error": "boom"}]
    append(layout.search_journal("st"), entries)
    st = search_status(layout, "st")
    assert st is not None
    line = status_line("st", {**st, "trial_details": None})
    assert "4/5 trials ended (2 complete, 1 failed, 1 pruned, 0 running)" in line, line
    assert "generation " in line and "best 0.75 (trial 1: " in line, line
