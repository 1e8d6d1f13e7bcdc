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

from .. import settings
from ..errors import UnknownTrainerError
from .base import PARAM_KINDS, Param, Reporter, TrainContext, Trainer, TrainResult

__all__ = ["PARAM_KINDS", "Param", "Reporter", "TrainContext", "TrainResult", "Trainer", "get_trainer",
           "registry"]

_REGISTRY: dict[str, Trainer] | None = None


def _add(registry: dict[str, Trainer], obj: object, origin: str) -> None:
    items = obj if isinstance(obj, list | tuple) else [obj]
    for trainer in items:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"{origin} does not provide orchestrator.trainers.Trainer objects")
        registry[trainer.name] = trainer


def registry() -> dict[str, Trainer]:
    """Every trainer this process may run, loaded once."""
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
            mod = importlib.import_module(module.strip())
            _add(reg, getattr(mod, "TRAINERS", getattr(mod, "TRAINER", None)), module)
        _REGISTRY = reg
    return _REGISTRY


def get_trainer(name: str) -> Trainer:
    reg = registry()
    if name not in reg:
        raise UnknownTrainerError(
            f"trainer {name!r} is not registered (registered: {', '.join(sorted(reg))})"
        )
    return reg[name]
