"""Trainers written as plain functions: `@orch.trainer("name", params={...})`.

The decorator declares a Trainer (orchestrator.trainers.base) for the function and
records it under the function's module. A worker registers the trainers of the modules
named in ORCH_TRAINER_MODULES (orchestrator.trainers.registry) and loads those modules at
its start, so a module that fails to import stops the worker there, not at its first
run. The process that declares one (a notebook, a script) registers it as well, so its
configs validate against the function's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .base import Param, TrainContext, Trainer, TrainResult

# Every trainer declared by a decorator in this process, by the module that declared it.
DECLARED: dict[str, dict[str, Trainer]] = {}
_changes = [0]  # declarations so far (a notebook cell run again declares anew)

Fn = TypeVar("Fn", bound=Callable[[TrainContext], Any])


def param_of(name: str, value: Any) -> Param:
    """A Param as given, or one inferred from a default value: a bool, an int, a float, a
    string or a list of ints."""
    if isinstance(value, Param):
        return value
    kind = ("bool" if isinstance(value, bool) else "int" if isinstance(value, int)
            else "float" if isinstance(value, float) else "str" if isinstance(value, str)
            else "int_list" if isinstance(value, list) and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value) else None)
    if kind is None:
        raise TypeError(f"parameter {name!r}: give a Param(default, kind, ...) or a default value "
                        f"that is a bool, int, float, str or list of ints, not {value!r}")
    return Param(value, kind)


def as_result(value: Any) -> TrainResult:
    """What a function trainer returned, as a TrainResult: one as it is, else an array of
    class probabilities (one row per row of ctx.X_eval)."""
    if isinstance(value, TrainResult):
        return value
    import numpy as np

    return TrainResult(probabilities=np.asarray(value, dtype=np.float64))


def trainer(name: str, params: Mapping[str, Param | Any] | None = None, *, version: str = "1",
            description: str = "", preload: Callable[[], None] | None = None) -> Callable[[Fn], Fn]:
    """Register a function as the trainer `name`, with its parameters.

    The function gets a TrainContext and returns class probabilities (an array with one
    row per row of `ctx.X_eval`) or a TrainResult. `params` maps each parameter to a
    Param or to its default value (its kind follows from the value). Change `version`
    when a change to the function changes its results: it is part of every run_id.

    Example (in a module that the workers list in ORCH_TRAINER_MODULES)::

        import orchestrator as orch

        @orch.trainer("centroid", params={"temperature": 1.0})
        def centroid(ctx):
            import numpy as np
            means = np.stack([ctx.X_train[ctx.y_train == c].mean(0) for c in range(ctx.n_classes)])
            logits = -((ctx.X_eval[:, None] - means[None]) ** 2).sum(2) / ctx.params["temperature"]
            p = np.exp(logits - logits.max(1, keepdims=True))
            return p / p.sum(1, keepdims=True)
    """
    declared = {k: param_of(k, v) for k, v in (params or {}).items()}

    def register(fn: Fn) -> Fn:
        def train(ctx: TrainContext) -> TrainResult:
            return as_result(fn(ctx))

        train.__qualname__ = train.__name__ = getattr(fn, "__name__", name)
        doc = (fn.__doc__ or "").strip().splitlines()
        made = Trainer(name=name, version=version, fn=train, params=declared,
                       description=description or (doc[0] if doc else ""), preload=preload)
        DECLARED.setdefault(getattr(fn, "__module__", "__main__"), {})[name] = made
        _changes[0] += 1
        return fn

    return register


def declared_in(module: str) -> list[Trainer]:
    """The trainers that decorators in `module` declared (after it was imported)."""
    return list(DECLARED.get(module, {}).values())


def changes() -> int:
    """How many declarations this process has made (the registry adds the new ones)."""
    return _changes[0]


def declared() -> list[Trainer]:
    """Every trainer declared by a decorator in this process."""
    return [t for by_name in DECLARED.values() for t in by_name.values()]
