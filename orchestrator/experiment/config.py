"""Load and validate experiment YAML into `Experiment` objects.

Validation collects every problem (file, key path, what was wrong, what would be valid)
and raises one ConfigError with all of them; nothing downstream re-checks.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, DatasetError, Problem, UnknownTrainerError, UnsafeNameError
from ..search.config import SearchConfig, parse_search
from ..trainers import Trainer, get_trainer, registry
from . import datasets
from .names import NAME_RE, NAME_RULE, check_relative_path, did_you_mean
from .spec import BACKENDS, DEVICES, RANKS_MAX, SEED_MAX, DatasetRef, Resources, gpus_problem
from .sweep import SweepError, axis_keys, expand_points

TOP_KEYS = {
    "experiment": "experiment name (required)",
    "description": "free text",
    "trainer": "registered trainer name (required)",
    "datasets": "list of built-in names or {name, csv, target} (required)",
    "folds": "k for stratified k-fold cross-validation (default 5)",
    "split": "{validation: fraction}: one train/validation split instead of folds",
    "holdout": "fraction held out of every fold, scored by the fold ensemble (default 0.2)",
    "seeds": "list of integer seeds (default [0])",
    "params": "trainer parameters shared by every run",
    "sweep": "grid / zip / random parameter axes",
    "search": "a search loop instead of a sweep: strategy, metric, trials, space (README)",
    "resources": "{gpus, gpu_memory_gb, ranks, backend}",
    "retries": "retries after a failed attempt (default 0)",
    "timeout": "seconds one attempt may take (default: none)",
    "priority": "0 (lowest) to 9 (highest), default 5",
    "output": "output folder under the results root (default '{experiment}/{dataset}')",
    "cuda": "params that replace `params` on a GPU worker",
    "cpu": "params that replace `params` on a CPU worker",
    "cuda_oom": "params that replace `params` (after `cuda`) when an attempt died of CUDA out-of-memory",
}
DEFAULT_OUTPUT = "{experiment}/{dataset}"
PLACEHOLDERS = ("experiment", "dataset")


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: everything `expand` needs, nothing left to check."""

    name: str
    file: str
    trainer: Trainer
    datasets: tuple[DatasetRef, ...]
    k: int | None
    validation: float | None
    holdout: float
    seeds: tuple[int, ...]
    points: tuple[tuple[str, dict[str, Any]], ...]  # (point name, stated params)
    resources: Resources
    retries: int
    timeout: float | None
    priority: int
    output: str  # template
    overrides: dict[str, dict[str, Any]]
    # A search: its points are proposed as it goes; `points` holds one, its fixed params.
    search: SearchConfig | None = None

    def output_for(self, dataset: str) -> str:
        return self.output.format(experiment=self.name, dataset=dataset)


# -- YAML with duplicate-key detection ---------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def find_configs(paths: list[str]) -> list[Path]:
    """Files named on the command line; a folder means every *.yaml / *.yml in it."""
    found: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted({*path.glob("*.yaml"), *path.glob("*.yml")})
            if not files:
                problems.append(Problem(raw, "", "folder has no *.yaml or *.yml files"))
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            problems.append(Problem(raw, "", "no such file or folder"))
    if problems:
        raise ConfigError(problems)
    return found


def load_experiments(paths: list[str]) -> list[Experiment]:
    """Load, validate and return every experiment, or raise one ConfigError for all."""
    return load_configs(paths)


# What a dict config is called in problems (the YAML's file name otherwise).
DICT_FILE = "<dict>"

Config = str | os.PathLike[str] | Mapping[str, Any]


def load_configs(configs: Sequence[Config]) -> list[Experiment]:
    """`load_experiments` for paths (files, folders) and plain dicts with the YAML's
    schema, mixed: every problem of every one in one ConfigError. A dict's CSV paths are
    relative to the current folder, and its problems name the file `<dict>`."""
    problems: list[Problem] = []
    experiments: list[Experiment] = []
    for config in configs:
        if isinstance(config, Mapping):
            found = [_load_doc(dict(config), DICT_FILE, Path.cwd(), problems)]
        else:
            try:
                files = find_configs([os.fspath(config)])
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            found = [_load_file(path, problems) for path in files]
        experiments.extend(exp for exp in found if exp is not None)
    seen: dict[str, str] = {}
    for exp in experiments:
        if exp.name in seen:
            problems.append(Problem(exp.file, "experiment",
                                    f"name {exp.name!r} is also used by {seen[exp.name]}"))
        seen[exp.name] = exp.file
    if problems:
        raise ConfigError(problems)
    return experiments


def _load_file(path: Path, problems: list[Problem]) -> Experiment | None:
    file = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(file, "", f"cannot read file: {exc}"))
        return None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(Problem(file, "", f"YAML syntax error at {where}: {reason}"))
        return None
    return _load_doc(doc, file, path.parent, problems)


def _load_doc(doc: Any, file: str, base: Path, problems: list[Problem]) -> Experiment | None:
    if not isinstance(doc, dict):
        problems.append(Problem(file, "", "must be a YAML mapping with at least "
                                          "'experiment', 'trainer' and 'datasets'"))
        return None
    before = len(problems)
    exp = _Validator(file, base, doc, problems).experiment()
    return exp if len(problems) == before else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite int or float (not a bool): NaN and inf never pass validation."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class _Validator:
    def __init__(self, file: str, base: Path, doc: dict[str, Any], problems: list[Problem]):
        self.file, self.base, self.doc, self.problems = file, base, doc, problems

    def bad(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.file, key, message))

    def experiment(self) -> Experiment | None:
        doc = self.doc
        for key in doc:
            if key not in TOP_KEYS:
                self.bad(str(key), f"unknown key{did_you_mean(str(key), list(TOP_KEYS))}; "
                                   f"valid keys: {', '.join(TOP_KEYS)}")
        name = self._name()
        trainer = self._trainer()
        dsets = self._datasets()
        k, validation = self._folds()
        holdout = self._fraction("holdout", 0.2, low_inclusive=True)
        seeds = self._seeds()
        resources = self._resources(trainer)
        retries = self._int("retries", 0, minimum=0, maximum=100)
        timeout = self._timeout()
        priority = self._int("priority", 5, minimum=0, maximum=9)
        output = self._output()
        params = self._params_block("params", trainer)
        overrides = {d: self._params_block(d, trainer) for d in DEVICES if d in doc}
        search = None
        points: list[tuple[str, dict[str, Any]]] | None = []
        if "search" in doc:  # one point: the fixed params every trial starts from
            search, points = self._search(trainer, params), [("base", dict(params))]
        else:
            points = self._points(trainer, params)
        if name is None or trainer is None or dsets is None or points is None:
            return None
        if not self.problems or all(p.file != self.file for p in self.problems):
            self._check_data(dsets, k, validation, holdout)
        return Experiment(
            name=name, file=self.file, trainer=trainer, datasets=tuple(dsets), k=k,
            validation=validation, holdout=holdout, seeds=tuple(seeds), points=tuple(points),
            resources=resources, retries=retries, timeout=timeout, priority=priority,
            output=output, overrides=overrides, search=search,
        )

    # -- fields ---------------------------------------------------------------------
    def _name(self) -> str | None:
        if "experiment" not in self.doc:
            self.bad("experiment", "required key is missing (a name like 'iris_mlp')")
            return None
        value = self.doc["experiment"]
        if not isinstance(value, str) or not NAME_RE.match(value):
            self.bad("experiment", f"{value!r} is not a valid name ({NAME_RULE})")
            return None
        return value

    def _trainer(self) -> Trainer | None:
        if "trainer" not in self.doc:
            self.bad("trainer", f"required key is missing (registered: {', '.join(sorted(registry()))})")
            return None
        value = self.doc["trainer"]
        try:
            return get_trainer(str(value))
        except UnknownTrainerError as exc:
            self.bad("trainer", f"{exc}{did_you_mean(str(value), list(registry()))}")
            return None

    def _datasets(self) -> list[DatasetRef] | None:
        value = self.doc.get("datasets")
        if value is None:
            self.bad("datasets", "required key is missing (a list such as [iris, wine])")
            return None
        if not isinstance(value, list) or not value:
            self.bad("datasets", "must be a non-empty list of built-in names "
                                 f"({', '.join(datasets.BUILTIN)}) or {{name, csv, target}} mappings")
            return None
        refs: list[DatasetRef] = []
        for i, item in enumerate(value):
            key = f"datasets[{i}]"
            if isinstance(item, str):
                if item not in datasets.BUILTIN:
                    self.bad(key, f"unknown built-in dataset {item!r}"
                                  f"{did_you_mean(item, list(datasets.BUILTIN))}; valid: "
                                  f"{', '.join(datasets.BUILTIN)}, or {{csv: path, target: column}}")
                    continue
                refs.append(DatasetRef(name=item, source="sklearn"))
            elif isinstance(item, dict):
                ref = self._csv_dataset(key, item)
                if ref:
                    refs.append(ref)
            else:
                self.bad(key, f"must be a built-in name or a {{csv, target}} mapping, got {item!r}")
        names = [r.name for r in refs]
        for n in {n for n in names if names.count(n) > 1}:
            self.bad("datasets", f"dataset name {n!r} appears twice; give CSVs distinct 'name's")
        return refs

    def _csv_dataset(self, key: str, item: dict[str, Any]) -> DatasetRef | None:
        allowed = ("name", "csv", "target")
        for k in item:
            if k not in allowed:
                self.bad(f"{key}.{k}", f"unknown key{did_you_mean(str(k), list(allowed))}; "
                                       f"valid: {', '.join(allowed)}")
        csv_path, target = item.get("csv"), item.get("target")
        if not isinstance(csv_path, str) or not csv_path.endswith(".csv"):
            self.bad(f"{key}.csv", "must be the path of a .csv file (relative to this YAML file)")
            return None
        if not isinstance(target, str) or not target:
            self.bad(f"{key}.target", "must name the CSV column that holds the class label")
            return None
        path = (self.base / csv_path).resolve()
        if not path.exists():
            self.bad(f"{key}.csv", f"file not found: {path}")
            return None
        name = item.get("name", path.stem)
        if not isinstance(name, str) or not NAME_RE.match(name):
            self.bad(f"{key}.name", f"{name!r} is not a valid name ({NAME_RULE})")
            return None
        try:  # a regular file within ORCH_DATASET_MAX_MB, read once
            digest = datasets.file_sha256(path)
        except DatasetError as exc:
            self.bad(f"{key}.csv", str(exc))
            return None
        return DatasetRef(name=name, source="csv", path=str(path), target=target, sha256=digest)

    def _folds(self) -> tuple[int | None, float | None]:
        if "folds" in self.doc and "split" in self.doc:
            self.bad("split", "give either 'folds' (k-fold) or 'split' (one split), not both")
            return 5, None
        if "split" in self.doc:
            split = self.doc["split"]
            if not isinstance(split, dict) or set(split) != {"validation"}:
                self.bad("split", "must be a mapping {validation: fraction}, e.g. {validation: 0.2}")
                return None, 0.2
            v = split["validation"]
            if not _is_num(v) or not 0 < v < 1:
                self.bad("split.validation", f"must be a fraction between 0 and 1, got {v!r}")
                return None, 0.2
            return None, float(v)
        return self._int("folds", 5, minimum=2, maximum=100), None

    def _int(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self.doc.get(key, default)
        if not _is_int(value) or not minimum <= value <= maximum:
            self.bad(key, f"must be an integer from {minimum} to {maximum}, got {value!r}")
            return default
        return int(value)

    def _fraction(self, key: str, default: float, low_inclusive: bool) -> float:
        value = self.doc.get(key, default)
        ok = _is_num(value) and (0 <= value < 0.9 if low_inclusive else 0 < value < 0.9)
        if not ok:
            self.bad(key, f"must be a fraction from 0 to below 0.9, got {value!r}")
            return default
        return float(value)

    def _seeds(self) -> list[int]:
        value = self.doc.get("seeds", [0])
        if _is_int(value):
            value = [value]
        if (not isinstance(value, list) or not value
                or not all(_is_int(s) and 0 <= s <= SEED_MAX for s in value)):
            self.bad("seeds", f"must be a list of non-negative integers like [0, 1, 2] (each at "
                              f"most {SEED_MAX}), got {value!r}")
            return [0]
        if len(set(value)) != len(value):
            self.bad("seeds", f"has repeated seeds: {value!r}")
        return list(value)

    def _resources(self, trainer: Trainer | None) -> Resources:
        value = self.doc.get("resources", {})
        if not isinstance(value, dict):
            self.bad("resources", "must be a mapping like {gpus: 1, gpu_memory_gb: 4, ranks: 2}")
            return Resources()
        valid = ["gpus", "gpu_memory_gb", "ranks", "backend"]
        for k in value:
            if k not in valid:
                self.bad(f"resources.{k}", f"unknown key{did_you_mean(str(k), valid)}; "
                                           f"valid: {', '.join(valid)}")
        gpus = value.get("gpus", 1)
        if gpus_problem(gpus) is not None:  # the rule every worker applies too
            self.bad("resources.gpus", "must be 0 (CPU), a share of one GPU up to 1 (0.25, 0.5, 1), or "
                                       f"a whole number of GPUs of one host (2, 4, 8), got {gpus!r}")
            gpus = 1
        mem = value.get("gpu_memory_gb")
        if mem is not None and (not _is_num(mem) or mem <= 0):
            self.bad("resources.gpu_memory_gb", f"must be a positive number of GiB, got {mem!r}")
            mem = None
        ranks, backend = value.get("ranks", 1), value.get("backend", "auto")
        if not _is_int(ranks) or not 1 <= ranks <= RANKS_MAX:
            self.bad("resources.ranks", f"must be an integer from 1 to {RANKS_MAX} (data-parallel "
                                        f"processes, one per worker), got {ranks!r}")
            ranks = 1
        elif ranks > 1 and trainer is not None and not trainer.ranks:
            able = sorted(t.name for t in registry().values() if t.ranks)
            self.bad("resources.ranks", f"trainer {trainer.name!r} does not support ranks (data-parallel "
                                        f"training); trainers that do: {', '.join(able) or 'none'}")
            ranks = 1
        if backend not in BACKENDS:
            self.bad("resources.backend", f"must be one of {', '.join(BACKENDS)} (auto: nccl on GPUs, "
                                          f"gloo on CPUs), got {backend!r}")
            backend = "auto"
        elif backend == "nccl" and gpus == 0:
            self.bad("resources.backend", "nccl needs GPUs (resources.gpus > 0); use gloo or auto on CPUs")
            backend = "auto"
        if ranks > 1 and isinstance(gpus, int | float) and gpus > 1:
            self.bad("resources.gpus", f"a data-parallel run takes at most one GPU per rank, got {gpus!r}")
        return Resources(gpus=float(gpus), gpu_memory_gb=None if mem is None else float(mem),
                         ranks=int(ranks), backend=str(backend))

    def _timeout(self) -> float | None:
        value = self.doc.get("timeout")
        if value is None:
            return None
        if not _is_num(value) or value <= 0:
            self.bad("timeout", f"must be a positive number of seconds, got {value!r}")
            return None
        return float(value)

    def _output(self) -> str:
        value = self.doc.get("output", DEFAULT_OUTPUT)
        if not isinstance(value, str):
            self.bad("output", f"must be a string such as {DEFAULT_OUTPUT!r}")
            return DEFAULT_OUTPUT
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            self.bad("output", f"malformed placeholder in {value!r}: {exc}")
            return DEFAULT_OUTPUT
        unknown = [f for f in fields if f not in PLACEHOLDERS]
        if unknown:
            self.bad("output", f"unknown placeholder {{{unknown[0]}}}; valid: {{experiment}}, {{dataset}}")
            return DEFAULT_OUTPUT
        try:
            check_relative_path(value.format(experiment="e", dataset="d"), "output")
        except UnsafeNameError as exc:
            self.bad("output", f"{exc}; it is a folder under the results root "
                               "(set the root with --results-root or ORCH_RESULTS_ROOT)")
            return DEFAULT_OUTPUT
        return value

    def _params_block(self, key: str, trainer: Trainer | None) -> dict[str, Any]:
        value = self.doc.get(key, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.bad(key, "must be a mapping of trainer parameters")
            return {}
        if trainer is not None:
            for name, v in value.items():
                self.check_param(trainer, f"{key}.{name}", str(name), v)
        return dict(value)

    def check_param(self, trainer: Trainer, key: str, name: str, value: Any) -> None:
        spec = trainer.params.get(name)
        if spec is None:
            self.bad(key, f"unknown parameter {name!r} for trainer {trainer.name!r}"
                          f"{did_you_mean(name, list(trainer.params))}; valid: {', '.join(trainer.params)}")
            return
        problem = spec.problem(value)
        if problem:
            self.bad(key, problem)

    def _search(self, trainer: Trainer | None, params: dict[str, Any]) -> SearchConfig | None:
        if "sweep" in self.doc:
            self.bad("search", "give either 'sweep' (fixed points) or 'search' (a search loop), not both")
        search, problems = parse_search(
            self.doc["search"], None if trainer is None else dict(trainer.params),
            lambda key, name, value: None if trainer is None else self.check_param(trainer, key, name, value),
            params)
        for key, message in problems:
            self.bad(key, message)
        return search

    def _points(self, trainer: Trainer | None, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
        sweep = self.doc.get("sweep")
        try:
            points = expand_points(sweep, params)
        except SweepError as exc:
            for key, message in exc.problems:
                self.bad(key, message)
            return None
        if trainer is not None:
            keys = axis_keys(sweep)
            swept: dict[str, set[str]] = {}
            for _, pt in points:
                for name, v in pt.items():
                    if name in params:
                        continue
                    fingerprint = repr(v)
                    if fingerprint in swept.setdefault(name, set()):
                        continue
                    swept[name].add(fingerprint)
                    before = len(self.problems)
                    self.check_param(trainer, keys.get(name, "sweep"), name, v)
                    if len(self.problems) > before:
                        break  # one message per parameter is enough
        return points

    def _check_data(self, dsets: list[DatasetRef], k: int | None, validation: float | None, holdout: float) -> None:
        for i, ref in enumerate(dsets):
            try:
                counts = datasets.class_counts(ref)
            except DatasetError as exc:
                self.bad(f"datasets[{i}]", str(exc))
                continue
            cls, count = min(counts.items(), key=lambda kv: kv[1])
            usable = int(count * (1 - holdout))
            if k is not None and usable < k:
                self.bad("folds", f"{k} folds need at least {k} samples of every class, but class "
                                  f"{cls!r} of dataset {ref.name!r} has {usable} after the holdout")
            if len(counts) < 2:
                self.bad(f"datasets[{i}]", f"dataset {ref.name!r} has only one class")
