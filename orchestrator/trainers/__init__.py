"""Trainer registry: the only code a worker will run for a message.

A trainer is a plain function `fn(ctx: TrainContext) -> TrainResult` plus a declaration
of its parameters. Built-in trainers are registered here; third-party ones come from the
`orchestrator.trainers` entry-point group, or from modules an operator names in
`ORCH_TRAINER_MODULES` (comma-separated) on the worker. A message naming anything else
is rejected before any code is imported for it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from .. import settings
from ..errors import TrainerModuleError, UnknownTrainerError
from . import functions
from .base import PARAM_KINDS, Param, Reporter, TrainContext, Trainer, TrainResult

__all__ = ["PARAM_KINDS", "Param", "Reporter", "TrainContext", "TrainResult", "Trainer", "get_trainer",
           "registry"]

_REGISTRY: dict[str, Trainer] | None = None
_SEEN: list[Any] = [0, set()]  # functions.changes() when last merged; names registered before them


def _add(registry: dict[str, Trainer], obj: object, origin: str) -> None:
    items = obj if isinstance(obj, list | tuple) else [obj]
    for trainer in items:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"{origin} does not provide orchestrator.trainers.Trainer objects")
        registry[trainer.name] = trainer


def registry() -> dict[str, Trainer]:
    """Every trainer this process may run, loaded once: the built-in ones, the entry
    points', those of the modules in ORCH_TRAINER_MODULES (a module's `TRAINERS` or
    `TRAINER`, or the functions it declared with `@orch.trainer`), and the function
    trainers this process declared itself (a notebook's), also after the first call.
    A module that cannot be imported: TrainerModuleError."""
    global _REGISTRY
    if _REGISTRY is None:
        reg: dict[str, Trainer] = {}
        from . import mlp, objective, prior

        _add(reg, mlp.TRAINER, "built-in mlp")
        _add(reg, objective.TRAINER, "built-in objective")
        _add(reg, prior.TRAINER, "built-in prior")
        for ep in entry_points(group="orchestrator.trainers"):
            if ep.name not in reg:
                _add(reg, ep.load(), f"entry point {ep.name}")
        for module in settings.value("ORCH_TRAINER_MODULES"):
            name = module.strip()
            try:
                mod = importlib.import_module(name)
            except Exception as exc:
                raise TrainerModuleError(
                    f"ORCH_TRAINER_MODULES: cannot import trainer module {name!r}: "
                    f"{type(exc).__name__}: {exc}") from exc
            found = getattr(mod, "TRAINERS", getattr(mod, "TRAINER", None))
            if found is None and functions.declared_in(mod.__name__):
                found = functions.declared_in(mod.__name__)
            _add(reg, found, module)
        _REGISTRY = reg
        _SEEN[1] = set(reg)
    if functions.changes() != _SEEN[0]:  # declared in this process since: added (again)
        for trainer in functions.declared():
            if trainer.name not in _SEEN[1]:  # a module's or built-in trainer stays
                _REGISTRY[trainer.name] = trainer
        _SEEN[0] = functions.changes()
    return _REGISTRY


def get_trainer(name: str) -> Trainer:
    reg = registry()
    if name not in reg:
        raise UnknownTrainerError(
            f"trainer {name!r} is not registered (registered: {', '.join(sorted(reg))})"
        )
    return reg[name]
