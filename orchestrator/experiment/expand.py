"""Experiment -> RunSpecs, and RunSpecs grouped by fold (the chord unit)."""

from __future__ import annotations

from collections.abc import Iterable

from .config import Experiment
from .spec import RunSpec


def expand(exp: Experiment) -> list[RunSpec]:
    """Every run of the experiment: dataset x point x seed x fold, in a stable order."""
    runs: list[RunSpec] = []
    if exp.search is not None:  # its runs come from its trials (orchestrator.search.engine)
        return runs
    for dataset in exp.datasets:
        for point, params in exp.points:
            for seed in exp.seeds:
                for fold in range(exp.k if exp.k is not None else 1):
                    runs.append(RunSpec(
                        experiment=exp.name, trainer=exp.trainer.name,
                        trainer_version=exp.trainer.version, dataset=dataset,
                        params=params, point=point, seed=seed, fold=fold, k=exp.k,
                        validation=exp.validation, holdout=exp.holdout,
                        output=exp.output_for(dataset.name), overrides=exp.overrides,
                        resources=exp.resources, retries=exp.retries, timeout=exp.timeout,
                        priority=exp.priority,
                    ))
    return runs


def groups(runs: Iterable[RunSpec]) -> list[list[RunSpec]]:
    """Runs that differ only by fold, in first-seen order."""
    by_id: dict[str, list[RunSpec]] = {}
    for run in runs:
        group = by_id.setdefault(run.group_id, [])
        clash = [other for other in group if other.fold == run.fold]
        if clash:  # two runs would share one set of files
            raise ValueError(f"runs {clash[0].name} and {run.name} have the same identity")
        group.append(run)
    return list(by_id.values())
