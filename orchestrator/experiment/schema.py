"""A JSON Schema (draft 2020-12) of the experiment YAML, for editors (`orchestrator schema`).

Built from the declarations the validator (experiment.config) uses: its top-level keys
and their descriptions, the sweep kinds and distributions, the built-in datasets, the
name rule, the resources rule, and every registered trainer's Params (kind, range,
choices, default, help), applied where `trainer:` names that trainer. What a schema
cannot say (a CSV file that exists, enough samples per class for the folds, the same
parameter on two axes) only the validator checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..search.config import (
    ASHA_KEYS,
    DIRECTIONS,
    EVOLUTION_KEYS,
    MAX_TRIALS,
    MODES,
    SEARCH_KEYS,
    STRATEGIES,
)
from ..trainers import Param, Trainer
from . import datasets
from .config import TOP_KEYS
from .names import NAME_RE, NAME_RULE
from .spec import BACKENDS, DEVICES, MAX_GPUS, MIN_GPU_SHARE, RANKS_MAX, SEED_MAX
from .sweep import DISTRIBUTIONS, RANDOM_KEYS, SWEEP_KEYS

SCHEMA_ID = "https://gpu-orchestrator.invalid/experiment.schema.json"


def param_schema(param: Param) -> dict[str, Any]:
    """What Param.problem accepts, as JSON Schema."""
    bounds: dict[str, Any] = {}
    if param.minimum is not None:
        bounds["minimum"] = param.minimum
    if param.maximum is not None:
        bounds["maximum"] = param.maximum
    kind: dict[str, Any] = {
        "int": {"type": "integer", **bounds},
        "float": {"type": "number", **bounds},
        "str": {"type": "string"},
        "bool": {"type": "boolean"},
        "int_list": {"anyOf": [{"type": "integer", **bounds},
                               {"type": "array", "minItems": 1, "items": {"type": "integer", **bounds}}]},
    }[param.kind]
    out = dict(kind)
    if param.choices is not None:
        out["enum"] = list(param.choices)
    out["default"] = param.default
    out["description"] = param.help or param.describe()
    return out


def _trainer_rule(trainer: Trainer) -> dict[str, Any]:
    """Where `trainer:` names this trainer: its params (in params, cuda, cpu, cuda_oom)
    and the sweep's axes are its parameters, with their values."""
    names = list(trainer.params)
    props = {n: param_schema(p) for n, p in trainer.params.items()}
    block = {"type": ["object", "null"], "properties": props, "additionalProperties": False}
    axis = {"type": "object", "propertyNames": {"enum": names},
            "properties": {n: {"type": "array", "minItems": 1, "items": s} for n, s in props.items()}}
    return {
        "if": {"properties": {"trainer": {"const": trainer.name}}, "required": ["trainer"]},
        "then": {"properties": {
            "params": block, **{d: block for d in DEVICES},
            "sweep": {"properties": {
                "grid": axis, "zip": axis,
                "random": {"properties": {"space": {"propertyNames": {"enum": names}}}}}},
        }},
    }


def _distribution() -> dict[str, Any]:
    number = {"type": "number"}
    pair = {"type": "array", "minItems": 2, "maxItems": 2}
    kinds = {
        "choice": {"type": "array", "minItems": 1},
        "uniform": {**pair, "items": number},
        "loguniform": {**pair, "items": {"type": "number", "exclusiveMinimum": 0}},
        "randint": {**pair, "items": {"type": "integer"}},
    }
    return {"oneOf": [{"type": "object", "properties": {k: {**v, "description": DISTRIBUTIONS[k]}},
                       "required": [k], "additionalProperties": False} for k, v in kinds.items()]}


def _search() -> dict[str, Any]:
    """The `search:` block (orchestrator.search.config declares it; the validator checks
    what a schema cannot: metric names, space against the trainer, nsga2's lists)."""
    count = {"type": "integer", "minimum": 1, "maximum": MAX_TRIALS}
    one_or_list = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
    pair = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}
    properties: dict[str, Any] = {
        "strategy": {"enum": list(STRATEGIES)},
        "metric": one_or_list,
        "direction": {"anyOf": [{"enum": list(DIRECTIONS)},
                                {"type": "array", "items": {"enum": list(DIRECTIONS)}, "minItems": 1}]},
        "trials": count, "parallel": count, "seed": {"type": "integer"},
        "mode": {"enum": list(MODES)},
        "max_failed_trials": {"type": "integer", "minimum": 0, "maximum": MAX_TRIALS},
        "space": {"type": "object", "additionalProperties": _distribution()},
        "architecture": {"type": "object", "additionalProperties": False, "properties": {
            "layers": pair, "width": pair, "activation": {"type": "array", "minItems": 1}, "dropout": pair}},
        "evolution": {"type": "object", "additionalProperties": False, "properties": {
            k: {"type": "number", "minimum": low, "maximum": high, "default": default}
            for k, (low, high, default) in EVOLUTION_KEYS.items()}},
        "asha": {"type": "object", "additionalProperties": False,
                 "properties": {k: {"type": "string"} if k == "metric" else {"type": "integer", "minimum": 1}
                                for k in ASHA_KEYS}},
    }
    assert set(properties) == set(SEARCH_KEYS)  # one declaration each
    for key, text in SEARCH_KEYS.items():
        properties[key].setdefault("description", text)
    return {"type": "object", "required": ["strategy"], "additionalProperties": False, "properties": properties}


def experiment_schema(trainers: Mapping[str, Trainer]) -> dict[str, Any]:
    """The schema of one experiment file, for these trainers (the registry's, usually)."""
    name = {"type": "string", "pattern": NAME_RE.pattern, "description": NAME_RULE}
    csv = {"type": "object", "required": ["csv", "target"], "additionalProperties": False,
           "properties": {"name": name, "csv": {"type": "string", "pattern": r"\.csv$",
                                                "description": "path of a .csv file, relative to this YAML file"},
                          "target": {"type": "string", "minLength": 1,
                                     "description": "the CSV column that holds the class label"}}}
    seed = {"type": "integer", "minimum": 0, "maximum": SEED_MAX}
    axis = {"type": "object", "minProperties": 1,
            "additionalProperties": {"type": "array", "minItems": 1}}
    properties: dict[str, Any] = {
        "experiment": name,
        "description": {"type": "string"},
        "trainer": {"enum": sorted(trainers)},
        "datasets": {"type": "array", "minItems": 1, "uniqueItems": True,
                     "items": {"anyOf": [{"enum": list(datasets.BUILTIN)}, csv]}},
        "folds": {"type": "integer", "minimum": 2, "maximum": 100},
        "split": {"type": "object", "required": ["validation"], "additionalProperties": False,
                  "properties": {"validation": {"type": "number", "exclusiveMinimum": 0,
                                                "exclusiveMaximum": 1}}},
        "holdout": {"type": "number", "minimum": 0, "exclusiveMaximum": 0.9},
        "seeds": {"anyOf": [seed, {"type": "array", "minItems": 1, "uniqueItems": True, "items": seed}]},
        "params": {"type": ["object", "null"]},
        "sweep": {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": {
            "grid": axis, "zip": axis,
            "random": {"type": "object", "required": ["samples", "space"], "additionalProperties": False,
                       "properties": {"samples": {"type": "integer", "minimum": 1, "maximum": 100000},
                                      "seed": {"type": "integer"},
                                      "space": {"type": "object", "minProperties": 1,
                                                "additionalProperties": _distribution()}}},
        }, "propertyNames": {"enum": list(SWEEP_KEYS)}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "gpus": {"anyOf": [{"const": 0}, {"type": "number", "minimum": MIN_GPU_SHARE, "maximum": 1},
                               {"type": "integer", "minimum": 2, "maximum": MAX_GPUS}],
                     "default": 1},
            "gpu_memory_gb": {"type": "number", "exclusiveMinimum": 0},
            "ranks": {"type": "integer", "minimum": 1, "maximum": RANKS_MAX, "default": 1,
                      "description": "data-parallel ranks: N workers train the run together"},
            "backend": {"enum": list(BACKENDS), "default": "auto",
                        "description": "torch.distributed backend: auto is nccl on GPUs, gloo on CPUs"}}},
        "retries": {"type": "integer", "minimum": 0, "maximum": 100, "default": 0},
        "timeout": {"type": "number", "exclusiveMinimum": 0},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9, "default": 5},
        "output": {"type": "string", "allOf": [
            {"pattern": r"^[^/]", "description": "a relative path"},
            {"pattern": r"^(?!(.*/)?\.\.(/|$))", "description": "no '..' component"},
            {"pattern": r"^(?:[^{}]|\{experiment\}|\{dataset\})*$",
             "description": "placeholders {experiment} and {dataset} only"}]},
        "search": _search(),
        **{d: {"type": ["object", "null"]} for d in DEVICES},
    }
    assert set(properties) == set(TOP_KEYS) and set(RANDOM_KEYS) == set(
        properties["sweep"]["properties"]["random"]["properties"])  # one declaration each
    for key, text in TOP_KEYS.items():
        properties[key].setdefault("description", text)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "gpu-orchestrator experiment",
        "description": "One experiment (README: Experiment YAML reference).",
        "type": "object",
        "required": ["experiment", "trainer", "datasets"],
        "additionalProperties": False,
        "properties": properties,
        "not": {"required": ["folds", "split"]},
        "allOf": [_trainer_rule(t) for _, t in sorted(trainers.items())],
    }
