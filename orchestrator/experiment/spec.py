"""RunSpec: the one object that crosses the broker, as JSON.

`from_dict` treats its input as untrusted (it comes from a broker message): its size and
depth are bounded before anything recursive touches it, every field is type- and
range-checked, every name that becomes a path is checked, and a refusal is one
InvalidSpecError naming the field and what would be valid (docs/security.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidSpecError
from .names import NAME_RE, NAME_RULE, check_relative_path, path_component

if TYPE_CHECKING:  # not imported here: parsing a spec loads no trainer
    from ..trainers import Trainer

# Override blocks: params that replace `params` on that device; "cuda_oom" applies on top
# of "cuda" to the attempt after one that died of CUDA out-of-memory.
DEVICES = ("cuda", "cpu", "cuda_oom")
BUILTIN_DATASETS = ("iris", "wine", "breast_cancer", "digits")  # scikit-learn's bundled ones

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state take no more
MIN_GPU_SHARE = 0.01  # at most 100 runs share one GPU; a smaller share only defeats packing
MAX_GPUS = 64  # whole GPUs of one host


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


BACKENDS = ("auto", "gloo", "nccl")
RANKS_MAX = 1024


@dataclass(frozen=True)
class Resources:
    gpus: float = 1.0  # GPUs per run; 0 sends the run to the `cpu` queue
    gpu_memory_gb: float | None = None  # GPU memory the run needs (admission: issue 4)
    # Data-parallel ranks (docs/data-parallel.md): 1 is an ordinary run; N > 1 a gang of
    # N rank tasks on N distinct workers, `gpus` each, meeting under torch.distributed.
    ranks: int = 1
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs), gloo or nccl

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpus": self.gpus, "gpu_memory_gb": self.gpu_memory_gb}
        if self.ranks != 1 or self.backend != "auto":  # an ordinary run's message is as before
            out.update(ranks=self.ranks, backend=self.backend)
        return out


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
    # Epochs at which the worker hands the trainer's report to the control side (an ASHA
    # search's rungs: orchestrator.search.rungs). Not part of the run's identity; in the
    # message only when set.
    report_at: tuple[int, ...] = ()

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
        out = {
            "experiment": self.experiment, "trainer": self.trainer,
            "trainer_version": self.trainer_version,
            "dataset": {"name": ds.name, "source": ds.source, "path": ds.path,
                        "target": ds.target, "sha256": ds.sha256},
            "params": dict(self.params), "point": self.point, "seed": self.seed,
            "fold": self.fold, "k": self.k, "validation": self.validation,
            "holdout": self.holdout, "output": self.output,
            "overrides": {d: dict(v) for d, v in self.overrides.items()},
            "resources": res.to_dict(),
            "retries": self.retries, "timeout": self.timeout, "priority": self.priority,
        }
        if self.report_at:
            out["report_at"] = list(self.report_at)
        return out

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> RunSpec:
        """Build a spec from untrusted JSON data, checking every field. Where this process
        has loaded the trainer registry (training workers, the CLI once it validated a
        config, the control worker once it finalized a group) and the spec names a
        registered trainer of its version, the params and every device's overrides are
        checked against that trainer's declared params too (`check_params`)."""
        try:
            spec = _parse_spec(data)
        except InvalidSpecError:
            raise
        except (TypeError, ValueError, KeyError, ArithmeticError, RecursionError) as exc:
            raise InvalidSpecError(f"malformed run spec: {_cut(str(exc))}") from None
        trainer = _loaded_trainer(spec.trainer)
        if trainer is not None and trainer.version == spec.trainer_version:
            check_params(spec, trainer)
        return spec


def gpus_problem(value: object) -> str | None:
    """Why `value` is not a valid `resources.gpus`, or None. The rule of the YAML reference:
    0 (the `cpu` queue), a share of one GPU up to 1 (0.25 lets four runs share it), or a
    whole number of GPUs of one host."""
    ok = (_is_number(value) and isinstance(value, int | float)
          and (value == 0 or MIN_GPU_SHARE <= value <= 1
               or (1 < value <= MAX_GPUS and value == int(value))))
    if ok:
        return None
    return (f"must be 0 (CPU), a share of one GPU from {MIN_GPU_SHARE} to 1 (0.25, 0.5, 1), or a "
            f"whole number of GPUs of one host from 2 to {MAX_GPUS} (2, 4, 8), got {_show(value)}")


def check_submitted_at(value: object) -> float | None:
    """`submitted_at`, the second argument of `tasks.train_run`: when the message was
    submitted, in seconds since the epoch (cancellations after it stop the run), or None
    when unknown. Untrusted like the spec: InvalidSpecError unless a finite number from 0
    to a day ahead of this host's clock (hosts' clocks differ by less than that)."""
    if value is None:
        return None
    if not _is_number(value) or not 0 <= float(value) <= time.time() + FUTURE_SKEW_SECONDS:  # type: ignore[arg-type]
        raise InvalidSpecError(
            "submitted_at must be null or the submission time in seconds since the epoch "
            f"(a finite number from 0 to now + {FUTURE_SKEW_SECONDS:.0f} s), got {_show(value)}")
    return float(value)  # type: ignore[arg-type]


def check_params(spec: RunSpec, trainer: Trainer) -> None:
    """The spec's params and each device's overrides (`cuda`, `cpu`, `cuda_oom`), every
    one of them whatever device this process trains on, against the trainer's declared
    params: InvalidSpecError naming each unknown or invalid one and what is valid."""
    problems = []
    blocks = [("params", spec.params), *((f"overrides.{d}", spec.overrides[d]) for d in spec.overrides)]
    for where, block in blocks:
        for name, value in block.items():
            param = trainer.params.get(name)
            if param is None:
                problems.append(f"{where}.{_cut(name, 40)}: unknown parameter of trainer "
                                f"{trainer.name!r} (valid: {', '.join(trainer.params)})")
            elif problem := param.problem(value):
                problems.append(f"{where}.{name}: {_cut(problem)}")
    if problems:
        raise InvalidSpecError(f"run spec params for trainer {trainer.name!r}: {'; '.join(problems)}")


def _loaded_trainer(name: str) -> Trainer | None:
    """The trainer `name` if this process has already loaded the registry (never loads it:
    a CLI reading manifests must not import trainer modules)."""
    module = sys.modules.get("orchestrator.trainers")
    registry = getattr(module, "_REGISTRY", None)
    return registry.get(name) if isinstance(registry, dict) else None


# -- strict parsing of untrusted dicts -------------------------------------------
# Bounds on what a message may carry. A genuine spec is under 2 KB, nested four deep
# (spec > overrides > device > a list of widths); these are far above that and far below
# what could cost a worker memory or time, or a RecursionError in anything recursive
# (json.dumps, pickling into the pool) that sees the spec after this.
MAX_DEPTH = 8
MAX_VALUES = 10_000  # objects, lists and scalars in one spec
MAX_TEXT = 4096  # characters of one string (PATH_MAX)
MAX_ALL_TEXT = 256 * 1024  # characters of all strings and keys of one spec
MAX_INT = 2**63 - 1
MAX_LABEL = 128  # trainer names and versions
FUTURE_SKEW_SECONDS = 24 * 3600.0

_SPEC_KEYS = (
    "experiment", "trainer", "trainer_version", "dataset", "params", "point", "seed",
    "fold", "k", "validation", "holdout", "output", "overrides", "resources", "retries",
    "timeout", "priority",
)
_OPTIONAL_SPEC_KEYS = ("report_at",)  # present only where set
MAX_REPORT_AT = 64
_DATASET_KEYS = ("name", "source", "path", "target", "sha256")
_RESOURCE_KEYS = ("gpus", "gpu_memory_gb")
_GANG_KEYS = ("ranks", "backend")  # present only in a data-parallel run's message
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cut(text: str, limit: int = 200) -> str:
    """`text` for an error message, cut short: a refused value may be megabytes."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _show(value: object, limit: int = 60) -> str:
    return _cut(repr(value), limit)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _fail(what: str, valid: str, value: object) -> InvalidSpecError:
    return InvalidSpecError(f"{what} must be {valid}, got {_show(value)}")


def _where(parent: str, key: object) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{str(key)[:40]}" if parent else str(key)[:40]


_JSON_TYPES = (str, dict, list, tuple, float, int, bool, type(None))


def _check_tree(data: object) -> None:
    """Depth, size and JSON types of the whole message, without recursion: every value a
    dict, list, string, finite number, boolean or null, strings without NUL characters or
    lone surrogates (they cannot be written to a file or a path). A value's field name is
    only built when it is refused or has children (a genuine spec: ~15 µs, of ~30 for all
    of from_dict)."""
    stack: list[tuple[Any, str, Any, int]] = [(data, "", None, 0)]
    values = chars = 0
    while stack:
        value, parent, key, depth = stack.pop()
        values += 1
        kind = type(value)
        if kind not in _JSON_TYPES:  # a subclass (from code, not from JSON) counts as its base
            kind = next((t for t in _JSON_TYPES if isinstance(value, t)), kind)
        if kind is str:
            chars += len(value)
            if len(value) > MAX_TEXT or "\x00" in value or not value.isascii():
                _check_text(value, _where(parent, key) or "run spec")
        elif kind is dict or kind is list or kind is tuple:
            where = "" if key is None else _where(parent, key)
            if depth >= MAX_DEPTH:
                raise InvalidSpecError(f"{where} is nested more than {MAX_DEPTH} levels deep; valid: parameter "
                                       "values that are numbers, strings, booleans or lists of them")
            if kind is dict:
                for k in value:
                    if not isinstance(k, str):
                        raise InvalidSpecError(f"{where or 'run spec'} has the key {_show(k)}; "
                                               "valid: string keys (JSON objects)")
                    chars += len(k)
                    if len(k) > MAX_TEXT or "\x00" in k or not k.isascii():
                        _check_text(k, f"{where or 'run spec'} key")
                stack.extend((v, where, k, depth + 1) for k, v in value.items())
            else:
                stack.extend((v, where, i, depth + 1) for i, v in enumerate(value))
        elif kind is float:
            if not math.isfinite(value):
                raise _fail(_where(parent, key), "a finite number", value)
        elif kind is int:
            if not -MAX_INT <= value <= MAX_INT:
                raise _fail(_where(parent, key), f"a number within ±{MAX_INT}", value)
        elif kind not in (bool, type(None)):
            raise InvalidSpecError(f"{_where(parent, key) or 'run spec'} has type {kind.__name__}; valid: "
                                   "JSON values (objects, lists, strings, numbers, booleans, null)")
        if values > MAX_VALUES:
            raise InvalidSpecError(f"run spec has more than {MAX_VALUES} values; a run spec has a few dozen")
        if chars > MAX_ALL_TEXT:
            raise InvalidSpecError(f"run spec has more than {MAX_ALL_TEXT} characters of text; "
                                   "a run spec has a few hundred")


def _check_text(value: str, what: str) -> None:
    if len(value) > MAX_TEXT:
        raise InvalidSpecError(f"{what} is {len(value)} characters long; valid: at most {MAX_TEXT}")
    if "\x00" in value:
        raise _fail(what, "text without NUL characters", value)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _fail(what, "text that is valid Unicode (no lone surrogates)", value) from None


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(what, f"an integer from {low} to {high}", value)
    return value


def _number(value: object, what: str, valid: str, low: float, high: float,
            low_open: bool = False, high_open: bool = False) -> float:
    if (not _is_number(value) or not isinstance(value, int | float) or value < low or value > high
            or (low_open and value == low) or (high_open and value == high)):
        raise _fail(what, valid, value)
    return float(value)


def _label(value: object, what: str, valid: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_LABEL or _CONTROL.search(value):
        raise _fail(what, f"{valid} (1-{MAX_LABEL} printable characters)", value)
    return value


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _fail(what, f"a name of {NAME_RULE}", value)
    return value


def _object(value: object, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(what, f"an object with the keys {', '.join(keys)}", value)
    unknown, missing = sorted(set(value) - set(keys)), [k for k in keys if k not in value]
    if unknown or missing:
        raise InvalidSpecError(f"{what} must have exactly the keys {', '.join(keys)}: "
                               f"unknown {[_show(k, 40) for k in unknown]}, missing {missing}")
    return value


def _params(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(what, "an object of trainer parameters", value)
    return dict(value)  # keys and values: checked by _check_tree (and check_params)


def _output(value: object) -> str:
    try:
        return check_relative_path(value, "output")
    except InvalidSpecError as exc:  # names' own error class; a refused spec is one class
        raise InvalidSpecError(f"{exc}; valid: a folder under the results root") from None


def _dataset(value: object) -> DatasetRef:
    ds = _object(value, "dataset", _DATASET_KEYS)
    source = ds["source"]
    if source == "sklearn":
        if (ds["path"], ds["target"], ds["sha256"]) != (None, None, None):
            raise InvalidSpecError("a bundled dataset (source sklearn) must have path, target and "
                                   "sha256 null")
        if ds["name"] not in BUILTIN_DATASETS:
            raise _fail("dataset name", f"a bundled dataset ({', '.join(BUILTIN_DATASETS)})", ds["name"])
        return DatasetRef(name=ds["name"], source=source)
    if source != "csv":
        raise _fail("dataset source", "sklearn or csv", source)
    path = ds["path"]
    if (not isinstance(path, str) or not path.startswith("/") or not path.endswith(".csv")
            or any(part in ("", ".", "..") for part in path[1:].split("/"))):
        raise _fail("dataset path", "an absolute, normalised path of a .csv file "
                                    "(no '.', '..' or empty components)", path)
    target = ds["target"]
    if not isinstance(target, str) or not target:
        raise _fail("dataset target", "the name of the CSV's label column", target)
    # The worker reads the file only if its content has this hash: a message can name
    # only a file whose exact content its sender already knows.
    sha = ds["sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _fail("dataset sha256", "64 lowercase hexadecimal digits", sha)
    return DatasetRef(name=_name(ds["name"], "dataset name"), source=source, path=path,
                      target=target, sha256=sha)


def _resources(value: object) -> Resources:
    if isinstance(value, dict) and ("ranks" in value or "backend" in value):
        res = _object(value, "resources", (*_RESOURCE_KEYS, *_GANG_KEYS))
        ranks, backend = res["ranks"], res["backend"]
        if type(ranks) is not int or not 1 <= ranks <= RANKS_MAX:
            raise _fail("resources.ranks", f"an integer from 1 to {RANKS_MAX}", ranks)
        if backend not in BACKENDS:
            raise _fail("resources.backend", " or ".join(BACKENDS), backend)
        return dataclasses.replace(_resources({k: res[k] for k in _RESOURCE_KEYS}), ranks=ranks,
                                   backend=backend)
    res = _object(value, "resources", _RESOURCE_KEYS)
    if problem := gpus_problem(res["gpus"]):
        raise InvalidSpecError(f"resources.gpus {problem}")
    memory = res["gpu_memory_gb"]
    return Resources(
        gpus=float(res["gpus"]),
        gpu_memory_gb=None if memory is None else _number(
            memory, "resources.gpu_memory_gb", "null or a positive number of GiB up to 1e6",
            0, 1e6, low_open=True),
    )


def _parse_spec(data: object) -> RunSpec:
    if not isinstance(data, dict):
        raise InvalidSpecError(f"run spec must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SPEC_KEYS) - set(_OPTIONAL_SPEC_KEYS), key=str)
    missing = [k for k in _SPEC_KEYS if k not in data]
    if unknown or missing:
        raise InvalidSpecError(f"run spec keys: unknown {[_show(k, 40) for k in unknown[:10]]}, "
                               f"missing {missing}; valid: exactly {', '.join(_SPEC_KEYS)}")
    _check_tree(data)  # before anything recursive or costly looks at the values
    k, validation = data["k"], data["validation"]
    if (k is None) == (validation is None):
        raise InvalidSpecError(
            "run spec must give exactly one of k (k-fold cross-validation) and validation "
            f"(one train/validation split), got k={_show(k)} and validation={_show(validation)}")
    if k is not None:
        k = _int(k, "k", 2, 100)
    else:
        validation = _number(validation, "validation", "a fraction between 0 and 1 (exclusive)",
                             0, 1, low_open=True, high_open=True)
    n_folds = k if k is not None else 1
    overrides = data["overrides"]
    if not isinstance(overrides, dict) or not set(overrides) <= set(DEVICES):
        raise _fail("overrides", f"an object whose keys are among {', '.join(DEVICES)}", overrides)
    timeout = data["timeout"]
    point = data["point"]
    if not isinstance(point, str) or not point:
        raise _fail("point", "the parameter point's name (a non-empty string)", point)
    return RunSpec(
        experiment=_name(data["experiment"], "experiment"),
        trainer=_label(data["trainer"], "trainer", "a registered trainer's name"),
        trainer_version=_label(data["trainer_version"], "trainer_version", "the trainer's version"),
        dataset=_dataset(data["dataset"]),
        params=_params(data["params"], "params"),
        point=point,
        seed=_int(data["seed"], "seed", 0, SEED_MAX),
        fold=_int(data["fold"], "fold", 0, n_folds - 1),
        k=k,
        validation=validation,
        holdout=_number(data["holdout"], "holdout", "a fraction from 0 to below 0.9", 0, 0.9,
                        high_open=True),
        output=_output(data["output"]),
        overrides={d: _params(v, f"overrides.{d}") for d, v in overrides.items()},
        resources=_resources(data["resources"]),
        retries=_int(data["retries"], "retries", 0, 100),
        timeout=None if timeout is None else _number(
            timeout, "timeout", "null or a positive number of seconds up to 1e9", 0, 1e9, low_open=True),
        priority=_int(data["priority"], "priority", 0, 9),
        report_at=_report_at(data.get("report_at", [])),
    )


def _report_at(value: object) -> tuple[int, ...]:
    valid = f"a list of at most {MAX_REPORT_AT} increasing epochs from 1 to 1000000"
    if not isinstance(value, list) or len(value) > MAX_REPORT_AT:
        raise _fail("report_at", valid, value)
    out = tuple(_int(v, "report_at", 1, 1_000_000) for v in value)
    if list(out) != sorted(set(out)):
        raise _fail("report_at", valid, value)
    return out
