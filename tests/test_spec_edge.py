"""Strict at the edge (issue 22): hostile values a broker message may carry, each refused
by RunSpec.from_dict / check_submitted_at with an InvalidSpecError that names the field
and what would be valid. Pure unit tests: no Redis, no workers."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import orchestrator.trainers as trainers
from orchestrator.errors import InvalidSpecError
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand
from orchestrator.experiment.spec import (
    MAX_DEPTH,
    RunSpec,
    check_params,
    check_submitted_at,
    gpus_problem,
)
from orchestrator.trainers import get_trainer

KFOLD = """\
experiment: edge
trainer: mlp
datasets: [iris]
folds: 3
holdout: 0.2
seeds: [7]
params: {hidden: [16], epochs: 2}
resources: {gpus: 0}
cuda: {batch_size: 64}
cpu: {batch_size: 16}
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A genuine spec from the YAML path (which also loads the trainer registry)."""
    path = tmp_path_factory.mktemp("edge") / "edge.yaml"
    path.write_text(KFOLD)
    return expand(load_experiments([str(path)])[0])[0].to_dict()


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return mutate


# (mutation, words the message must contain: the field, and what would be valid)
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    # issue 22, point 5
    "validation-with-k": (_set("validation", 0.2), ("exactly one of k", "validation")),
    "neither-k-nor-validation": (_set("k", None), ("exactly one of k", "validation")),
    "gpus-3.5": (_set("resources.gpus", 3.5), ("resources.gpus", "whole number of GPUs", "3.5")),
    "gpus-5e-324": (_set("resources.gpus", 5e-324), ("resources.gpus", "share of one GPU from 0.01")),
    "gpus-negative": (_set("resources.gpus", -1), ("resources.gpus",)),
    "gpus-65": (_set("resources.gpus", 65), ("resources.gpus", "from 2 to 64")),
    "gpus-bool": (_set("resources.gpus", True), ("resources.gpus",)),
    "cuda-unknown-key": (_set("overrides.cuda", {"batch_sise": 8}),
                         ("overrides.cuda.batch_sise", "unknown parameter", "valid: hidden")),
    "cuda-bad-value": (_set("overrides.cuda", {"batch_size": -3}), ("overrides.cuda.batch_size", ">= 1")),
    "cpu-bad-value": (_set("overrides.cpu", {"dropout": 2.0}), ("overrides.cpu.dropout", "<= 0.95")),
    "cuda-oom-bad-type": (_set("overrides.cuda_oom", {"batch_size": "big"}),
                          ("overrides.cuda_oom.batch_size", "an integer")),
    "params-unknown-key": (_set("params.smoothing", 1.0), ("params.smoothing", "unknown parameter")),
    "params-negative-epochs": (_set("params.epochs", -1), ("params.epochs", ">= 1")),
    # found by trying hostile values
    "params-nested-600": (_set("params.hidden", _nested(600)), ("params.hidden", f"{MAX_DEPTH} levels")),
    "overrides-nested-600": (_set("overrides.cuda", {"hidden": _nested(600)}),
                             ("overrides.cuda.hidden", "levels deep")),
    "params-nan": (_set("params.lr", float("nan")), ("params.lr", "finite number")),
    "params-minus-inf": (_set("params.lr", float("-inf")), ("params.lr", "finite number")),
    "params-huge-int": (_set("params.epochs", 10**30), ("params.epochs", "within")),
    "params-huge-string": (_set("params.activation", "relu" * 300_000), ("params.activation", "at most 4096")),
    "params-many-values": (_set("params.hidden", [1] * 20_000), ("more than 10000 values",)),
    "params-nul": (_set("params.activation", "re\x00lu"), ("params.activation", "NUL")),
    "params-surrogate": (_set("params.activation", "\ud800"), ("params.activation", "surrogates")),
    "params-set": (_set("params.hidden", {16}), ("params.hidden", "JSON values")),
    "params-key-not-str": (_set("params", {1: 2}), ("string keys",)),
    "seed-negative": (_set("seed", -1), ("seed", "from 0 to 4294967295")),
    "seed-2**32": (_set("seed", 2**32), ("seed", "from 0 to 4294967295")),
    "seed-float": (_set("seed", 7.0), ("seed", "an integer")),
    "fold-negative": (_set("fold", -1), ("fold", "from 0 to 2")),
    "fold-huge": (_set("fold", 10**18), ("fold", "from 0 to 2")),
    "k-huge": (_set("k", 10**18), ("k", "from 2 to 100")),
    "k-one": (_set("k", 1), ("k", "from 2 to 100")),
    "retries-huge": (_set("retries", 10**9), ("retries", "from 0 to 100")),
    "priority-10": (_set("priority", 10), ("priority", "from 0 to 9")),
    "holdout-0.9": (_set("holdout", 0.9), ("holdout", "below 0.9")),
    "timeout-zero": (_set("timeout", 0), ("timeout", "positive number of seconds")),
    "timeout-bool": (_set("timeout", True), ("timeout",)),
    "gpu-memory-negative": (_set("resources.gpu_memory_gb", -4), ("resources.gpu_memory_gb", "positive")),
    "trainer-huge": (_set("trainer", "x" * 5000), ("trainer", "at most 4096")),
    "trainer-control-chars": (_set("trainer", "mlp\n"), ("trainer", "printable")),
    "trainer-empty": (_set("trainer", ""), ("trainer", "printable")),
    "trainer-version-long": (_set("trainer_version", "1" * 200), ("trainer_version", "1-128")),
    "point-empty": (_set("point", ""), ("point", "non-empty")),
    "point-not-str": (_set("point", 5), ("point", "non-empty string")),
    "experiment-long": (_set("experiment", "e" * 65), ("experiment", "1-64 characters")),
    "bundled-dataset-unknown": (_set("dataset.name", "passwd"), ("dataset name", "iris, wine")),
    "csv-path-dotdot": (lambda d: d["dataset"].update(source="csv", path="/data/../etc/x.csv", target="y",
                                                      sha256="0" * 64), ("dataset path", "normalised")),
    "csv-path-nul": (lambda d: d["dataset"].update(source="csv", path="/data/x\x00.csv", target="y",
                                                   sha256="0" * 64), ("NUL",)),
    "csv-sha-upper": (lambda d: d["dataset"].update(source="csv", path="/data/x.csv", target="y",
                                                    sha256="A" * 64), ("dataset sha256", "64 lowercase")),
    "csv-target-empty": (lambda d: d["dataset"].update(source="csv", path="/data/x.csv", target="",
                                                       sha256="0" * 64), ("dataset target", "label column")),
    "overrides-unknown-device": (_set("overrides", {"tpu": {}}), ("overrides", "cuda, cpu, cuda_oom")),
    "overrides-block-list": (_set("overrides.cuda", [1]), ("overrides.cuda", "object of trainer parameters")),
    "unknown-key-huge": (lambda d: d.update({"k" * 100_000: 1}), ("run spec keys", "valid: exactly")),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_spec_is_refused_naming_field_and_valid(base: dict[str, Any], case: str) -> None:
    mutate, words = HOSTILE[case]
    data = copy.deepcopy(base)
    mutate(data)
    started = time.monotonic()
    with pytest.raises(InvalidSpecError) as info:
        RunSpec.from_dict(data)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert len(message) < 1500, message  # a huge value is not echoed back whole
    assert time.monotonic() - started < 1.0


def test_the_genuine_spec_is_accepted_and_round_trips(base: dict[str, Any]) -> None:
    spec = RunSpec.from_dict(copy.deepcopy(base))
    assert RunSpec.from_dict(json.loads(spec.to_json())) == spec
    single = copy.deepcopy(base)
    single.update(k=None, validation=0.25, fold=0)
    assert RunSpec.from_dict(single).validation == 0.25


@pytest.mark.parametrize("gpus", [0, 0.01, 0.25, 0.5, 1, 1.0, 2, 4.0, 8, 64])
def test_valid_gpus_pass(base: dict[str, Any], gpus: float) -> None:
    assert gpus_problem(gpus) is None
    data = copy.deepcopy(base)
    data["resources"]["gpus"] = gpus
    assert RunSpec.from_dict(data).resources.gpus == gpus


@pytest.mark.parametrize("gpus", [3.5, 5e-324, 0.001, -0.5, 1.5, 65, 128, float("nan"), float("inf"), True, "1", None])
def test_invalid_gpus_have_a_problem(gpus: object) -> None:
    assert gpus_problem(gpus)


def test_device_overrides_are_checked_whatever_device_this_process_trains_on(base: dict[str, Any]) -> None:
    """check_params is what a CPU worker calls: a bad `cuda` block is refused there too."""
    spec = RunSpec.from_dict(copy.deepcopy(base))
    trainer = get_trainer("mlp")
    check_params(spec, trainer)
    data = copy.deepcopy(base)
    data["overrides"] = {"cuda": {"batch_size": 0, "shell": "x"}}
    saved = trainers._REGISTRY
    trainers._REGISTRY = None  # a process that has not loaded the registry parses shape only
    try:
        bare = RunSpec.from_dict(copy.deepcopy(data))
    finally:
        trainers._REGISTRY = saved
    with pytest.raises(InvalidSpecError) as info:
        check_params(bare, trainer)
    assert "overrides.cuda.batch_size: must be >= 1" in str(info.value)
    assert "overrides.cuda.shell: unknown parameter" in str(info.value)
    with pytest.raises(InvalidSpecError, match="overrides.cuda.batch_size"):
        RunSpec.from_dict(data)  # registry loaded: from_dict checks them itself


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf"), True, False, "1700000000",
                                   -1, [1.0], time.time() + 10 * 86400, 1e300],
                         ids=["nan", "-inf", "inf", "true", "false", "text", "negative", "list",
                              "ten-days-ahead", "1e300"])
def test_submitted_at_refused(value: object) -> None:
    with pytest.raises(InvalidSpecError, match="submitted_at must be null or the submission time"):
        check_submitted_at(value)


@pytest.mark.parametrize("value", [None, 0, 1_700_000_000, 1_700_000_000.5])
def test_submitted_at_accepted(value: object) -> None:
    got = check_submitted_at(value)
    assert got == (None if value is None else float(value))
    assert got is None or isinstance(got, float)
    now = time.time()
    assert check_submitted_at(now) == now


def test_nan_from_json_text_anywhere_is_refused(base: dict[str, Any]) -> None:
    text = json.dumps(base).replace('"holdout": 0.2', '"holdout": -Infinity')
    assert math.isinf(json.loads(text)["holdout"])
    with pytest.raises(InvalidSpecError, match="holdout"):
        RunSpec.from_dict(json.loads(text))


def test_a_yaml_valid_share_and_split_still_parse(tmp_path: Path) -> None:
    """The YAML path's valid values (a GPU share, a single split) pass the strict parser."""
    path = tmp_path / "s.yaml"
    path.write_text(KFOLD.replace("folds: 3", "split: {validation: 0.3}").replace("gpus: 0", "gpus: 0.25"))
    for spec in expand(load_experiments([str(path)])[0]):
        assert RunSpec.from_dict(json.loads(spec.to_json())) == spec
