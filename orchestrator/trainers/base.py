"""What a trainer is: a plain function `fn(ctx: TrainContext) -> TrainResult` plus a
declaration of its parameters (Param), reporting through a Reporter. The registry of
trainers is orchestrator.trainers."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is loaded by the trainers: validating a config needs none
    import numpy as np

PARAM_KINDS = ("int", "float", "str", "bool", "int_list")


@dataclass(frozen=True)
class Param:
    """One trainer parameter: its default and what values are valid."""

    default: Any
    kind: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def problem(self, value: Any) -> str | None:
        """Why `value` is invalid, or None if it is fine."""
        ok_type = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int_list": (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list) and bool(value)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)),
        }[self.kind]
        if not ok_type:
            return f"must be {self.describe()}, got {value!r}"
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            return f"must be a finite number, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        nums = value if isinstance(value, list) else [value]
        for v in nums if self.kind in ("int", "float", "int_list") else []:
            if self.minimum is not None and v < self.minimum:
                return f"must be >= {self.minimum}, got {value!r}"
            if self.maximum is not None and v > self.maximum:
                return f"must be <= {self.maximum}, got {value!r}"
        return None

    def describe(self) -> str:
        kind = {"int": "an integer", "float": "a number", "str": "a string",
                "bool": "true or false", "int_list": "a list of positive integers"}[self.kind]
        if self.minimum is not None and self.maximum is not None:
            kind += f" in [{self.minimum}, {self.maximum}]"
        elif self.minimum is not None:
            kind += f" >= {self.minimum}"
        return kind


@dataclass
class Reporter:
    """Trainers call `report(epoch=..., **metrics)`; the last values go into metadata."""

    last: dict[str, Any] = field(default_factory=dict)
    on_report: Callable[[dict[str, Any]], None] | None = None
    # Asked at every report: a reason to stop (the attempt lost its lease, or its
    # experiment was cancelled) ends the trainer there instead of at its last epoch.
    should_stop: Callable[[], str | None] | None = None

    def report(self, **values: Any) -> None:
        import numpy as np

        self.last = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in values.items()}
        if self.on_report is not None:
            self.on_report(self.last)
        if self.should_stop is not None and (why := self.should_stop()):
            from ..errors import RunStopped

            raise RunStopped(why, cancelled="cancel" in why)


@dataclass(frozen=True)
class TrainContext:
    params: Mapping[str, Any]  # trainer defaults + stated params + device overrides
    device: str  # "cuda" or "cpu"
    seed: int
    fold: int
    run_name: str  # readable, e.g. exp/iris/lr=0.01/seed=0/fold=2
    X_train: np.ndarray
    y_train: np.ndarray
    X_eval: np.ndarray  # validation rows then holdout rows
    n_classes: int
    reporter: Reporter
    # Set for a data-parallel run (resources.ranks > 1): torch.distributed is initialised
    # and this is orchestrator.execution.gang.DistInfo (rank, world, backend, checkpoint
    # load/save for rank 0). None for an ordinary run.
    dist: Any = None


@dataclass(frozen=True)
class TrainResult:
    probabilities: np.ndarray  # (len(X_eval), n_classes), rows sum to 1
    params_count: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trainer:
    name: str
    version: str
    fn: Callable[[TrainContext], TrainResult]
    params: Mapping[str, Param]
    description: str = ""
    # Optional warm-up a worker's pool child runs once at start (e.g. `import torch`),
    # so the first run does not pay for it. Must not initialise CUDA.
    preload: Callable[[], None] | None = None
    # Whether `fn` trains data-parallel when TrainContext.dist is set (resources.ranks > 1):
    # a run asking ranks of a trainer that does not is refused at validation (exit 2).
    ranks: bool = False

    def resolve(self, stated: Mapping[str, Any]) -> dict[str, Any]:
        return {**{k: p.default for k, p in self.params.items()}, **stated}
