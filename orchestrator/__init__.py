"""Distributed experiment runner for GPU training on Celery and Redis.

The Python API (docs/api.md)::

    import orchestrator as orch

    with orch.local(workers=2) as client:          # or orch.Client("redis://head:6379/0")
        exp = client.submit({"experiment": "demo", "trainer": "prior",
                             "datasets": ["iris"], "folds": 3})
        exp.wait()
        rows = exp.results()                          # final_results.csv as records
        future = client.evaluate("prior", {"smoothing": 0.5}, "iris")
        print(future.result().accuracy)

Kept import-light on purpose: Celery workers import `orchestrator.experiment.spec`, `.paths`
and `.status` from here, and must not pull in the CLI, torch or CUDA. The API's names are
loaded when first used (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api.client import Checked, Client, Plan, local
    from .api.futures import RunFuture, RunResult, as_completed
    from .api.handle import Experiment
    from .errors import (
        ConfigError,
        EnvironmentProblem,
        EvaluationError,
        ExperimentNotFound,
        OrchestratorError,
        Problem,
        SettingError,
        TrainerModuleError,
        UnknownTrainerError,
    )
    from .trainers.base import Param, TrainContext, TrainResult
    from .trainers.functions import trainer

# name -> the module that defines it
_EXPORTS = {
    "Client": "api.client", "local": "api.client", "Checked": "api.client", "Plan": "api.client",
    "Experiment": "api.handle",
    "RunFuture": "api.futures", "RunResult": "api.futures", "as_completed": "api.futures",
    "trainer": "trainers.functions",
    "Param": "trainers.base", "TrainContext": "trainers.base", "TrainResult": "trainers.base",
    **{name: "errors" for name in (
        "OrchestratorError", "ConfigError", "Problem", "EnvironmentProblem", "EvaluationError",
        "ExperimentNotFound", "SettingError", "TrainerModuleError", "UnknownTrainerError")},
}

__all__ = [
    "Checked", "Client", "ConfigError", "EnvironmentProblem", "EvaluationError", "Experiment",
    "ExperimentNotFound", "OrchestratorError", "Param", "Plan", "Problem", "RunFuture", "RunResult",
    "SettingError", "TrainContext", "TrainResult", "TrainerModuleError", "UnknownTrainerError",
    "as_completed", "local", "trainer",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
