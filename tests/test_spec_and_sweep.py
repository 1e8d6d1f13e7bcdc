"""Pure unit tests (no Redis, no workers): RunSpec JSON, run ids, sweep expansion, safe names."""

from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import InvalidSpecError, UnsafeNameError
from orchestrator.experiment.config import Experiment, load_experiments
from orchestrator.experiment.expand import expand, groups
from orchestrator.experiment.names import COMPONENT_RE, check_relative_path, path_component
from orchestrator.experiment.spec import RunSpec
from orchestrator.experiment.sweep import SweepError, expand_points
from orchestrator.paths import Layout

IRIS = """\
experiment: iris_kfold
trainer: mlp
datasets: [iris]
folds: 5
holdout: 0.2
seeds: [42]
params:
  hidden: [32]
  epochs: 60
  batch_size: 16
sweep:
  grid:
    lr: [0.01, 0.003]
resources:
  gpus: 1
retries: 1
"""


def load(tmp_path: Path, text: str, name: str = "exp.yaml") -> Experiment:
    path = tmp_path / name
    path.write_text(text)
    return load_experiments([str(path)])[0]


def specs(tmp_path: Path, text: str, name: str = "exp.yaml") -> list[RunSpec]:
    return expand(load(tmp_path, text, name))


def run_ids(runs: list[RunSpec]) -> set[str]:
    return {r.run_id for r in runs}


# -- RunSpec JSON round trip ---------------------------------------------------------
def _csv_config(tmp_path: Path) -> str:
    rows = ["f1,f2,label"] + [f"{i},{i * 2 % 7},{'ab'[i % 2]}" for i in range(20)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return ("experiment: csv_exp\ntrainer: mlp\ndatasets: [{csv: data.csv, target: label, name: toy}]\n"
            "split: {validation: 0.25}\nholdout: 0\nseeds: [0, 1]\ntimeout: 30\npriority: 8\n"
            "resources: {gpus: 0.5, gpu_memory_gb: 2}\ncpu: {epochs: 3}\n")


@pytest.mark.parametrize("kind", ["iris", "csv"])
def test_runspec_round_trip(tmp_path: Path, kind: str) -> None:
    text = IRIS + "cuda: {batch_size: 64}\n" if kind == "iris" else _csv_config(tmp_path)
    runs = specs(tmp_path, text)
    assert runs
    for spec in runs:
        data = spec.to_dict()
        assert RunSpec.from_dict(data) == spec
        again = RunSpec.from_dict(json.loads(spec.to_json()))
        assert again == spec
        assert again.to_json() == spec.to_json()
        assert again.run_id == spec.run_id and again.group_id == spec.group_id
        assert json.loads(spec.to_json()) == json.loads(json.dumps(data))
    if kind == "csv":
        assert runs[0].dataset.source == "csv" and runs[0].dataset.path.startswith("/")
        assert runs[0].queue == "gpu" and runs[0].timeout == 30.0


def test_expand_order_and_groups(tmp_path: Path) -> None:
    runs = specs(tmp_path, IRIS)
    assert len(runs) == 2 * 5  # 2 points x 1 seed x 5 folds
    assert [r.fold for r in runs] == [0, 1, 2, 3, 4] * 2
    assert [r.point for r in runs[::5]] == ["lr=0.01", "lr=0.003"]
    assert len(run_ids(runs)) == 10
    assert [len(g) for g in groups(runs)] == [5, 5]
    assert runs[0].name == "iris_kfold/iris/lr=0.01/seed=42/fold=0"
    assert runs[0].group_dir == "iris_kfold/iris/lr=0.01/seed=42"


# -- RunSpec.from_dict rejects untrusted input -----------------------------------------
def _base(tmp_path: Path) -> dict[str, Any]:
    return specs(tmp_path, IRIS + "cuda: {batch_size: 64}\n")[0].to_dict()


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return mutate


def _del(key: str) -> Any:
    return lambda d: d.pop(key)


BAD_SPECS = {
    "unknown-key": _set("shell", "rm -rf /"),
    "missing-key": _del("seed"),
    "missing-overrides": _del("overrides"),
    "experiment-dotdot": _set("experiment", "../etc"),
    "experiment-slash": _set("experiment", "a/b"),
    "experiment-not-str": _set("experiment", 7),
    "output-absolute": _set("output", "/abs"),
    "output-escapes": _set("output", "a/../../b"),
    "output-empty-component": _set("output", "a//b"),
    "output-dot": _set("output", "."),
    "dataset-source-pickle": _set("dataset.source", "pickle"),
    "dataset-name-dotdot": _set("dataset.name", ".."),
    "dataset-extra-key": _set("dataset.loader", "x"),
    "dataset-csv-relative": lambda d: d["dataset"].update(source="csv", path="data.csv", target="y",
                                                            sha256="0" * 64),
    "fold-equals-k": _set("fold", 5),
    "fold-negative": _set("fold", -1),
    "fold-bool": _set("fold", True),
    "fold-without-k": lambda d: d.update(k=None, fold=1),
    "params-nan": _set("params.lr", float("nan")),
    "params-inf-nested": _set("params.hidden", [32, float("inf")]),
    "params-not-dict": _set("params", [["lr", 0.1]]),
    "params-non-str-key": _set("params", {1: 2}),
    "params-non-json-value": _set("params.lr", {0.1}),
    "overrides-unknown-device": _set("overrides", {"tpu": {}}),
    "overrides-nan": _set("overrides", {"cuda": {"lr": float("nan")}}),
    "seed-bool": _set("seed", False),
    "seed-str": _set("seed", "42"),
    "holdout-nan": _set("holdout", float("nan")),
    "timeout-inf": _set("timeout", float("inf")),
    "resources-extra": _set("resources.cores", 4),
    "resources-gpus-str": _set("resources.gpus", "1"),
}


@pytest.mark.parametrize("mutate", list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_from_dict_rejects(tmp_path: Path, mutate: Any) -> None:
    data = copy.deepcopy(_base(tmp_path))
    RunSpec.from_dict(copy.deepcopy(data))  # the unmodified base is accepted
    mutate(data)
    with pytest.raises(InvalidSpecError):
        RunSpec.from_dict(data)


@pytest.mark.parametrize("data", [None, [], "spec", 42, 1.5, True, ["experiment"]],
                         ids=["none", "list", "str", "int", "float", "bool", "list-of-keys"])
def test_from_dict_rejects_non_dict(data: object) -> None:
    with pytest.raises(InvalidSpecError):
        RunSpec.from_dict(data)


def test_from_dict_rejects_nan_from_json_text(tmp_path: Path) -> None:
    """Python's json.loads accepts NaN; a broker message carrying it must still be refused."""
    text = json.dumps(_base(tmp_path)).replace('"lr": 0.01', '"lr": NaN')
    data = json.loads(text)
    assert math.isnan(data["params"]["lr"])
    with pytest.raises(InvalidSpecError):
        RunSpec.from_dict(data)


# -- run_id stability -----------------------------------------------------------------
def test_adding_grid_value_keeps_other_run_ids(tmp_path: Path) -> None:
    before = specs(tmp_path, IRIS, "a.yaml")
    after = specs(tmp_path, IRIS.replace("[0.01, 0.003]", "[0.01, 0.003, 0.001]"), "b.yaml")
    assert len(after) == len(before) + 5
    assert run_ids(before) < run_ids(after)
    new = {r.run_id for r in after if r.point == "lr=0.001"}
    assert run_ids(after) - run_ids(before) == new and len(new) == 5
    assert {r.group_id for r in before} < {r.group_id for r in after}


def test_changing_fixed_param_changes_every_run_id(tmp_path: Path) -> None:
    before = specs(tmp_path, IRIS, "a.yaml")
    after = specs(tmp_path, IRIS.replace("epochs: 60", "epochs: 61"), "b.yaml")
    assert len(after) == len(before)
    assert run_ids(before).isdisjoint(run_ids(after))


def test_run_id_ignores_experiment_name_and_scheduling(tmp_path: Path) -> None:
    before = specs(tmp_path, IRIS, "a.yaml")
    after = specs(tmp_path, IRIS.replace("iris_kfold", "renamed").replace("retries: 1", "retries: 3")
                  + "priority: 9\ntimeout: 100\n", "b.yaml")
    assert [r.run_id for r in before] == [r.run_id for r in after]


def test_device_overrides_do_not_change_run_id(tmp_path: Path) -> None:
    plain = specs(tmp_path, IRIS, "a.yaml")
    tuned = specs(tmp_path, IRIS + "cuda:\n  batch_size: 64\ncpu:\n  epochs: 5\n", "b.yaml")
    assert [r.run_id for r in plain] == [r.run_id for r in tuned]
    assert [r.group_id for r in plain] == [r.group_id for r in tuned]
    spec = tuned[0]
    assert spec.params["batch_size"] == 16
    assert spec.params_for("cuda")["batch_size"] == 64
    assert spec.params_for("cuda")["epochs"] == 60
    assert spec.params_for("cpu")["batch_size"] == 16
    assert spec.params_for("cpu")["epochs"] == 5
    assert spec.params_for("cuda")["lr"] == 0.01  # the swept value survives the override
    assert plain[0].params_for("cuda") == dict(plain[0].params)
    assert RunSpec.from_dict(spec.to_dict()).params_for("cuda")["batch_size"] == 64


# -- sweep expansion: golden names and order ----------------------------------------------
GOLDEN = IRIS.split("sweep:")[0].replace("folds: 5", "folds: 2").replace(
    "  hidden: [32]\n", "").replace("  epochs: 60\n  batch_size: 16\n", "  activation: tanh\n") + """\
sweep:
  grid:
    lr: [0.01, 0.001]
    hidden: [[32], [64, 32]]
  zip:
    epochs: [10, 20]
    batch_size: [8, 16]
  random:
    samples: 3
    seed: 7
    space:
      dropout: {uniform: [0.0, 0.5]}
      weight_decay: {loguniform: [0.0001, 0.1]}
"""

_DRAWS = ["dropout=0.1619,weight_decay=0.0002835",
          "dropout=0.3255,weight_decay=0.0001649",
          "dropout=0.2679,weight_decay=0.00125"]
GOLDEN_POINTS = [
    f"lr={lr},hidden={hidden},{zipped},{draw}"
    for lr in ("0.01", "0.001")
    for hidden in ("32", "64-32")
    for zipped in ("epochs=10,batch_size=8", "epochs=20,batch_size=16")
    for draw in _DRAWS
]


def test_golden_point_names_and_order(tmp_path: Path) -> None:
    first = load(tmp_path, GOLDEN, "g1.yaml")
    second = load(tmp_path, GOLDEN, "g2.yaml")
    names = [n for n, _ in first.points]
    assert names == [n for n, _ in second.points]
    assert len(names) == 2 * 2 * 2 * 3 == 24
    assert len(set(names)) == 24
    assert names == GOLDEN_POINTS
    # the params of a point: fixed ones first, then swept ones in declared order
    name, params = first.points[0]
    assert list(params) == ["activation", "lr", "hidden", "epochs", "batch_size", "dropout", "weight_decay"]
    assert params == {"activation": "tanh", "lr": 0.01, "hidden": [32], "epochs": 10, "batch_size": 8,
                      "dropout": 0.1619, "weight_decay": 0.0002835}
    runs = expand(first)
    assert [r.point for r in runs[::2]] == GOLDEN_POINTS  # 2 folds per point
    assert [r.run_id for r in runs] == [r.run_id for r in expand(second)]


def test_random_draws_are_within_bounds_and_seeded() -> None:
    sweep = {"random": {"samples": 50, "seed": 7, "space": {
        "dropout": {"uniform": [0.0, 0.5]}, "lr": {"loguniform": [1e-4, 1e-1]},
        "epochs": {"randint": [1, 4]}, "activation": {"choice": ["relu", "tanh"]}}}}
    first = expand_points(sweep, {})
    random.seed(12345)  # the module-level generator must not matter
    random.random()
    second = expand_points(copy.deepcopy(sweep), {})
    assert first == second
    for _, p in first:
        assert 0.0 <= p["dropout"] <= 0.5
        assert 1e-4 <= p["lr"] <= 1e-1
        assert p["epochs"] in (1, 2, 3, 4)
        assert p["activation"] in ("relu", "tanh")
    other = expand_points({"random": {**sweep["random"], "seed": 8}}, {})
    assert [n for n, _ in other] != [n for n, _ in first]


def test_random_default_seed_is_fixed() -> None:
    sweep = {"random": {"samples": 5, "space": {"dropout": {"uniform": [0.0, 0.5]}}}}
    assert expand_points(sweep, {}) == expand_points(sweep, {})
    assert expand_points(sweep, {}) == expand_points({"random": {**sweep["random"], "seed": 0}}, {})


def test_random_duplicate_draws_are_dropped() -> None:
    sweep = {"random": {"samples": 40, "seed": 1, "space": {"activation": {"choice": ["relu", "tanh"]}}}}
    names = [n for n, _ in expand_points(sweep, {})]
    assert sorted(names) == ["activation=relu", "activation=tanh"]


def test_no_sweep_is_one_base_point() -> None:
    assert expand_points(None, {"lr": 0.1}) == [("base", {"lr": 0.1})]


def test_distinct_grid_values_are_not_merged() -> None:
    points = expand_points({"grid": {"lr": [0.1234567, 0.1234568]}}, {})
    assert [p["lr"] for _, p in points] == [0.1234567, 0.1234568]


# -- names.path_component / check_relative_path -------------------------------------------
@pytest.mark.parametrize("text", ["lr=0.01,hidden=64-32", "base", "a+b", "x_1.5"])
def test_path_component_keeps_safe_text(text: str) -> None:
    assert path_component(text) == text


@pytest.mark.parametrize("text", ["a/b", "../x", "..", ".", "", "/etc/passwd", "a b", "lr=1e-3;rm",
                                  "é", "x" * 81, "a\x00b", ".hidden", "a\nb"])
def test_path_component_is_safe_and_hashes_when_lossy(text: str) -> None:
    safe = path_component(text)
    assert COMPONENT_RE.match(safe)
    assert safe not in (".", "..") and "/" not in safe
    assert check_relative_path(safe, "component") == safe
    assert safe != text
    assert re.search(r"-[0-9a-f]{8}$", safe), safe
    assert len(safe) <= 80
    assert path_component(text) == safe  # deterministic


def test_path_component_lossy_inputs_do_not_collide() -> None:
    texts = ["a/b", "a_b", "a b", "a:b", "x" * 100, "x" * 100 + "y"]
    outs = [path_component(t) for t in texts]
    assert len(set(outs)) == len(texts)
    assert path_component("a_b") == "a_b"


# -- Layout refuses paths that leave the root ---------------------------------------------
def test_layout_inside_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "results")
    spec = specs(tmp_path, IRIS)[0]
    assert layout.group_dir(spec) == (tmp_path / "results/iris_kfold/iris/lr=0.01/seed=42").resolve()
    assert layout.fold_status(spec).is_relative_to(layout.root)
    assert layout.manifest("iris_kfold") == layout.root / "iris_kfold" / "experiment.json"


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", "/abs", "", ".x"])
def test_layout_refuses_bad_experiment_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeNameError):
        Layout(tmp_path).experiment_dir(name)


@pytest.mark.parametrize("output", ["../outside", "a/../../b", "/tmp/abs", "a//b", "./a"])
def test_layout_refuses_spec_output_leaving_root(tmp_path: Path, output: str) -> None:
    spec = specs(tmp_path, IRIS)[0]
    forged = RunSpec(**{**spec.__dict__, "output": output})  # not via from_dict
    layout = Layout(tmp_path / "results")
    with pytest.raises(UnsafeNameError):
        layout.group_dir(forged)
    with pytest.raises(UnsafeNameError):
        layout.fold_files(forged)


def test_layout_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    root = tmp_path / "results"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    layout = Layout(root)
    with pytest.raises(UnsafeNameError, match="leaves the results root"):
        layout.experiment_dir("link")


def test_points_whose_names_clash_are_reported() -> None:
    # 1 and 1.0 are different params (different run ids) but would share one folder.
    with pytest.raises(SweepError, match="both named 'lr=1'"):
        expand_points({"grid": {"lr": [1, 1.0]}}, {})


@pytest.mark.parametrize("seed", range(5))
def test_numpy_scores_match_scikit_learn(seed: int) -> None:
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    from orchestrator.collect.metrics import scores

    rng = np.random.default_rng(seed)
    n_classes = 4
    y = rng.integers(0, 3, size=40)  # class 3 never occurs: it still counts in macro-F1
    probs = rng.dirichlet(np.ones(n_classes), size=40)
    got = scores(y, probs)
    labels = list(range(n_classes))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert got["log_loss"] == pytest.approx(log_loss(y, probs, labels=labels))
    assert got["macro_f1"] == pytest.approx(
        f1_score(y, probs.argmax(1), average="macro", labels=labels, zero_division=0))


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
def test_builtin_class_counts_match_the_data(name: str) -> None:
    from orchestrator.experiment import datasets
    from orchestrator.experiment.spec import DatasetRef

    ref = DatasetRef(name=name, source="sklearn")
    table = datasets.load(ref)
    real = dict(zip(table.classes, map(int, __import__("numpy").bincount(table.y)), strict=True))
    assert datasets.class_counts(ref) == real
