"""RunSpec: the one object that crosses the broker, as JSON.

`from_dict` treats its input as untrusted (it comes from a broker message): every field
is type-checked and every name that becomes a path is checked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSpecError
from .names import check_name, check_relative_path, path_component

# Override blocks: params that replace `params` on that device; "cuda_oom" applies on top
# of "cuda" to the attempt after one that died of CUDA out-of-memory.
DEVICES = ("cuda", "cpu", "cuda_oom")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def content_hash(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class DatasetRef:
    """Where a dataset comes from; `identity()` is what enters the run id."""

    name: str
    source: str  # "sklearn" (bundled) or "csv"
    path: str | None = None  # absolute path of a CSV file
    target: str | None = None  # CSV column holding the label
    sha256: str | None = None  # CSV content hash at submission time

    def identity(self) -> dict[str, Any]:
        if self.source == "sklearn":
            return {"source": "sklearn", "name": self.name}
        # The name too: two names for byte-identical files are two datasets with two
        # output folders, and must not collapse into one run id.
        return {"source": "csv", "name": self.name, "sha256": self.sha256, "target": self.target}


@dataclass(frozen=True)
class Resources:
    gpus: float = 1.0  # GPUs per run; 0 sends the run to the `cpu` queue
    gpu_memory_gb: float | None = None  # GPU memory the run needs (admission: issue 4)


@dataclass(frozen=True)
class RunSpec:
    """One run: (experiment, dataset, parameter point, seed, fold)."""

    experiment: str
    trainer: str
    trainer_version: str
    dataset: DatasetRef
    params: Mapping[str, Any]  # exactly as the YAML states them (no trainer defaults)
    point: str  # readable name of the parameter point, e.g. "hidden=64,lr=0.01"
    seed: int
    fold: int
    k: int | None  # None: a single train/validation split
    validation: float | None  # validation fraction of a single split
    holdout: float  # fraction held out of every fold, scored by the fold ensemble
    output: str  # output folder, relative to the results root
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by device
    resources: Resources = field(default_factory=Resources)
    retries: int = 0
    timeout: float | None = None
    priority: int = 5

    # -- identity ---------------------------------------------------------------
    def _identity(self, with_fold: bool) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "trainer": self.trainer,
            "trainer_version": self.trainer_version,
            "dataset": self.dataset.identity(),
            "params": dict(self.params),
            "seed": self.seed,
            "k": self.k,
            "validation": self.validation,
            "holdout": self.holdout,
        }
        if with_fold:
            ident["fold"] = self.fold
        return ident

    @functools.cached_property  # frozen dataclass: cached in __dict__, not a field
    def run_id(self) -> str:
        """Content hash of what determines the result; device overrides stay out."""
        return content_hash(self._identity(with_fold=True))

    @functools.cached_property
    def group_id(self) -> str:
        """Same for every fold of one (dataset, point, seed): the chord unit."""
        return content_hash(self._identity(with_fold=False))

    @functools.cached_property
    def run_key(self) -> str:
        """The run's work item in Redis (lease, attempts, progress, logs): its content
        (run_id) where its outputs go. Two experiments with identical runs but their own
        folders are two pieces of work; the same run into the same folder is one."""
        return content_hash({"run_id": self.run_id, "group_dir": self.group_dir})

    @functools.cached_property
    def name(self) -> str:
        return f"{self.group_name}/fold={self.fold}"

    @functools.cached_property
    def group_name(self) -> str:
        return f"{self.experiment}/{self.dataset.name}/{self.point}/seed={self.seed}"

    @functools.cached_property
    def group_dir(self) -> str:
        """Group folder relative to the results root."""
        return f"{self.output}/{path_component(self.point)}/seed={self.seed}"

    @property
    def n_folds(self) -> int:
        return self.k if self.k is not None else 1

    @property
    def queue(self) -> str:
        """`cpu`; `gpu` (one GPU or a share of one); `gpu.multi` for runs over several
        GPUs of one host, which only multi-GPU workers (`worker --gpus 0,1,...`) take."""
        gpus = self.resources.gpus
        return "cpu" if gpus <= 0 else "gpu" if gpus <= 1 else "gpu.multi"

    def params_for(self, device: str, after_oom: bool = False) -> dict[str, Any]:
        """Stated params with this device's overrides applied on top (and, on a GPU after
        an out-of-memory death, the `cuda_oom` block on top of those)."""
        merged = dict(self.params)
        merged.update(self.overrides.get(device, {}))
        if after_oom and device == "cuda":
            merged.update(self.overrides.get("cuda_oom", {}))
        return merged

    # -- JSON -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (built by hand: dataclasses.asdict deep-copies, and
        submitting 1000 runs called this thousands of times)."""
        ds, res = self.dataset, self.resources
        return {
            "experiment": self.experiment, "trainer": self.trainer,
            "trainer_version": self.trainer_version,
            "dataset": {"name": ds.name, "source": ds.source, "path": ds.path,
                        "target": ds.target, "sha256": ds.sha256},
            "params": dict(self.params), "point": self.point, "seed": self.seed,
            "fold": self.fold, "k": self.k, "validation": self.validation,
            "holdout": self.holdout, "output": self.output,
            "overrides": {d: dict(v) for d, v in self.overrides.items()},
            "resources": {"gpus": res.gpus, "gpu_memory_gb": res.gpu_memory_gb},
            "retries": self.retries, "timeout": self.timeout, "priority": self.priority,
        }

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> RunSpec:
        """Build a spec from untrusted JSON data, checking every field."""
        try:
            return _parse_spec(data)
        except InvalidSpecError:
            raise
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            raise InvalidSpecError(f"malformed run spec: {exc}") from exc


# -- strict parsing of untrusted dicts -------------------------------------------
_SPEC_KEYS = {
    "experiment", "trainer", "trainer_version", "dataset", "params", "point", "seed",
    "fold", "k", "validation", "holdout", "output", "overrides", "resources", "retries",
    "timeout", "priority",
}


def _expect(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise InvalidSpecError(f"{what} must be {types}, got a boolean")
    if not isinstance(value, types):
        raise InvalidSpecError(f"{what} has type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidSpecError(f"{what} must be finite")
    return value


def _bounded(value: Any, low: float, high: float, what: str,
             low_open: bool = False, high_open: bool = False) -> None:
    _expect(value, (int, float), what)
    if (value < low or (low_open and value == low) or value > high
            or (high_open and value == high)):
        raise InvalidSpecError(f"{what} {value!r} is out of range")


def _json_params(value: Any, what: str) -> dict[str, Any]:
    _expect(value, dict, what)
    for key in value:
        _expect(key, str, f"{what} key")
    canonical_json(value)  # rejects NaN and non-JSON values
    return dict(value)


def _parse_spec(data: object) -> RunSpec:
    if not isinstance(data, dict):
        raise InvalidSpecError("run spec must be a JSON object")
    unknown = set(data) - _SPEC_KEYS
    missing = _SPEC_KEYS - set(data)
    if unknown or missing:
        raise InvalidSpecError(f"run spec keys: unknown {sorted(unknown)}, missing {sorted(missing)}")
    ds = _expect(data["dataset"], dict, "dataset")
    if set(ds) != {"name", "source", "path", "target", "sha256"}:
        raise InvalidSpecError("dataset must have name, source, path, target, sha256")
    source = ds["source"]
    if source not in ("sklearn", "csv"):
        raise InvalidSpecError(f"dataset source {source!r} is not sklearn or csv")
    if source == "csv":
        path = _expect(ds["path"], str, "dataset path")
        if not path.startswith("/") or not path.endswith(".csv"):
            raise InvalidSpecError("dataset path must be an absolute path to a .csv file")
        _expect(ds["target"], str, "dataset target")
        # The worker reads the file only if its content has this hash: a message can
        # name only a file whose exact content its sender already knows.
        if not re.fullmatch(r"[0-9a-f]{64}", _expect(ds["sha256"], str, "dataset sha256")):
            raise InvalidSpecError("dataset sha256 must be 64 hexadecimal digits")
    elif (ds["path"], ds["target"], ds["sha256"]) != (None, None, None):
        raise InvalidSpecError("a bundled dataset has no path, target or sha256")
    dataset = DatasetRef(
        name=check_name(ds["name"], "dataset"), source=source, path=ds["path"],
        target=ds["target"], sha256=ds["sha256"],
    )
    res = _expect(data["resources"], dict, "resources")
    if set(res) != {"gpus", "gpu_memory_gb"}:
        raise InvalidSpecError("resources must have gpus and gpu_memory_gb")
    overrides = _expect(data["overrides"], dict, "overrides")
    if not set(overrides) <= set(DEVICES):
        raise InvalidSpecError(f"overrides devices must be among {DEVICES}")
    k = data["k"]
    if k is not None:
        _expect(k, int, "k")
    fold = _expect(data["fold"], int, "fold")
    if not 0 <= fold < (k if k is not None else 1):
        raise InvalidSpecError(f"fold {fold} out of range for k={k}")
    timeout = data["timeout"]
    _bounded(data["seed"], 0, 2**63, "seed")
    _bounded(data["retries"], 0, 100, "retries")
    _bounded(data["priority"], 0, 9, "priority")
    _bounded(data["holdout"], 0, 0.9, "holdout", high_open=True)
    if k is not None:
        _bounded(k, 2, 100, "k")
    if data["validation"] is not None:
        _bounded(data["validation"], 0, 1, "validation", low_open=True, high_open=True)
    _bounded(res["gpus"], 0, 64, "resources.gpus")
    if res["gpu_memory_gb"] is not None:
        _bounded(res["gpu_memory_gb"], 0, 1e6, "resources.gpu_memory_gb", low_open=True)
    if timeout is not None:
        _bounded(timeout, 0, 1e9, "timeout", low_open=True)
    return RunSpec(
        experiment=check_name(data["experiment"], "experiment"),
        trainer=_expect(data["trainer"], str, "trainer"),
        trainer_version=_expect(data["trainer_version"], str, "trainer_version"),
        dataset=dataset,
        params=_json_params(data["params"], "params"),
        point=_expect(data["point"], str, "point"),
        seed=_expect(data["seed"], int, "seed"),
        fold=fold,
        k=k,
        validation=None if data["validation"] is None else float(_expect(data["validation"], (int, float), "validation")),
        holdout=float(_expect(data["holdout"], (int, float), "holdout")),
        output=check_relative_path(data["output"], "output"),
        overrides={d: _json_params(v, f"overrides.{d}") for d, v in overrides.items()},
        resources=Resources(
            gpus=float(_expect(res["gpus"], (int, float), "resources.gpus")),
            gpu_memory_gb=None if res["gpu_memory_gb"] is None
            else float(_expect(res["gpu_memory_gb"], (int, float), "resources.gpu_memory_gb")),
        ),
        retries=_expect(data["retries"], int, "retries"),
        timeout=None if timeout is None else float(_expect(timeout, (int, float), "timeout")),
        priority=_expect(data["priority"], int, "priority"),
    )
