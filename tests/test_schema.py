"""`orchestrator schema`: a JSON Schema of the experiment YAML for editors. Every shipped
example validates against it; every file of the bad-config table (tests/test_config_errors.py)
fails against it or against the validator, and the ones only the validator can catch
are named here."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import load_configs
from orchestrator.experiment.schema import experiment_schema
from orchestrator.trainers import Param, Trainer, registry

from .conftest import REPO, cli_env
from .test_config_errors import BUGS, CASES, Case

# What no JSON Schema says: files on disk, the data, the YAML's own duplicate keys,
# relations between values (lengths, low < high, a parameter fixed and swept), NaN.
VALIDATOR_ONLY = {
    "csv-file-missing", "csv-target-not-a-column", "zip-unequal-lengths", "random-low-above-high",
    "param-fixed-and-swept", "param-swept-on-two-axes", "yaml-syntax-error", "yaml-duplicate-key",
    "folds-exceed-smallest-class", "param-nan", "param-inf", "timeout-inf", "markup-low-high-swallowed",
}


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = experiment_schema(registry())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _examples() -> list[tuple[str, Any]]:
    """Every shipped example: configs/*.yaml and the README's YAML reference."""
    found = [(str(p.relative_to(REPO)), yaml.safe_load(p.read_text()))
             for p in sorted((REPO / "configs").glob("*.yaml"))]
    readme = (REPO / "README.md").read_text()
    reference = readme.split("## Experiment YAML reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", reference, re.S)
    assert block is not None
    found.append(("README.md reference", yaml.safe_load(block.group(1))))
    return found


def test_the_command_prints_a_valid_schema_with_the_trainers_params() -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "schema"], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    names = schema["properties"]["trainer"]["enum"]
    assert names == sorted(names) and {"mlp", "prior", "slow", "flaky"} <= set(names)  # tests.plugins too
    rules = {r["if"]["properties"]["trainer"]["const"]: r["then"]["properties"] for r in schema["allOf"]}
    lr = rules["mlp"]["params"]["properties"]["lr"]
    assert lr["type"] == "number" and lr["minimum"] == 1e-08 and lr["default"] == 0.01
    assert rules["mlp"]["params"]["properties"]["activation"]["enum"][0] == "relu"
    assert rules["slow"]["sweep"]["properties"]["grid"]["propertyNames"]["enum"] == [
        "seconds", "short_fold", "smoothing"]


@pytest.mark.parametrize(("name", "doc"), _examples(), ids=[n for n, _ in _examples()])
def test_every_shipped_example_validates(name: str, doc: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(doc)]
    assert errors == [], name


def _case_files(case: Case, tmp_path: Path) -> Path:
    for fname, content in case.files.items():
        (tmp_path / fname).write_text(content)
    path = tmp_path / "exp.yaml"
    path.write_text(case.yaml)
    return path


TABLE = [*CASES, *(Case(b.id, b.values[0], b.values[1], b.values[2]) for b in BUGS)]


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_every_bad_config_fails_the_schema_or_the_validator(case: Case, tmp_path: Path) -> None:
    path = _case_files(case, tmp_path)
    with pytest.raises(ConfigError):
        load_configs([path])
    try:
        doc = yaml.safe_load(case.yaml)
    except yaml.YAMLError:
        doc = None
    schema_errors = [] if doc is None else list(_validator().iter_errors(doc))
    if case.id in VALIDATOR_ONLY:
        assert schema_errors == [], "the schema catches it now: take it off VALIDATOR_ONLY"
    else:
        assert schema_errors, f"{case.id}: the schema accepts it"
        # The schema points at the same key as the validator (or the one containing it).
        paths = {".".join(map(str, e.absolute_path)) for e in schema_errors}
        top = (case.key or "").split(".")[0].split("[")[0]
        assert any(p.split(".")[0] == top or p == "" for p in paths), (paths, case.key)


def test_a_function_trainers_params_are_in_the_schema() -> None:
    def fn(ctx: Any) -> Any:
        return None

    extra = Trainer("fn", "1", fn, {"depth": Param(3, "int", minimum=1), "mode": Param("a", "str", choices=("a", "b"))})
    v = jsonschema.Draft202012Validator(experiment_schema({**registry(), "fn": extra}))
    base = {"experiment": "e", "trainer": "fn", "datasets": ["iris"]}
    assert list(v.iter_errors({**base, "params": {"depth": 2}, "sweep": {"grid": {"mode": ["a", "b"]}}})) == []
    bad = {**base, "params": {"depth": 0, "width": 1}, "sweep": {"grid": {"mode": ["c"]}}}
    assert sorted(".".join(map(str, e.absolute_path)) for e in v.iter_errors(bad)) == [
        "params", "params.depth", "sweep.grid.mode.0"]
