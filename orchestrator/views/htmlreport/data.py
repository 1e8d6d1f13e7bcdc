"""The report's data: every group and fold of an experiment, read from the results root."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...collect.results import read_final_results
from ...collect.status import Status, fold_state, read_group_status
from ...dispatch.manifest import load_manifest
from ...experiment.spec import RunSpec
from ...paths import Layout
from ..overview import group_state

# metric -> True when higher is better (the fold metrics every run records).

METRICS = {"accuracy": True, "macro_f1": True, "log_loss": False}
MAX_GROUPS_PLOTTED = 40  # per-fold strip plot: beyond this only the best groups are drawn
MAX_CONFUSION = 6  # datasets whose best group gets confusion matrices
DONE = Status.DONE.value


@dataclass
class FoldInfo:
    fold: int
    run_id: str
    state: str  # fold_state(): DONE only when the outputs are intact; NEW when unknown
    worker: str | None
    started_at: float | None
    finished_at: float | None
    metrics: dict[str, float]
    error: str | None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the record's "history"
    recorded: str | None = None  # the status its record states (DONE even if files are gone)


@dataclass
class GroupInfo:
    name: str
    group_id: str
    label: str  # the name without the experiment: dataset/point/seed=N
    dataset: str
    seed: int
    params: dict[str, Any]  # as the YAML stated them
    state: str
    folds: list[FoldInfo]
    ensemble: dict[str, Path]
    rows: list[dict[str, str]] = field(default_factory=list)  # its final_results.csv rows
    status_metrics: dict[str, Any] = field(default_factory=dict)  # status.json oof/ensemble
    failed: dict[str, str] = field(default_factory=dict)

    def fold_score(self, metric: str) -> list[float]:
        return [f.metrics[metric] for f in self.folds
                if f.state == DONE and isinstance(f.metrics.get(metric), int | float)]

    def score(self, metric: str) -> float | None:
        """Mean over its DONE folds (for a finalized group, the mean of its CSV rows)."""
        values = self.fold_score(metric)
        return statistics.fmean(values) if values else None

    def csv_mean(self, column: str) -> float | None:
        values = [float(r[column]) for r in self.rows if r.get(column) not in (None, "")]
        return statistics.fmean(values) if values else None


@dataclass
class ReportData:
    experiment: str
    root: Path
    config: str | None
    submitted_at: float | None
    groups: list[GroupInfo]
    swept: list[str]  # parameters whose value differs between groups
    csv_path: Path
    csv_found: bool
    generated_at: float


@dataclass
class Figure:
    slug: str  # file name without .png
    title: str
    caption: str
    png: bytes


@dataclass
class ReportResult:
    html: Path
    images: list[Path]
    data: ReportData


# -- 1. collect ------------------------------------------------------------------------
def param_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def collect(layout: Layout, experiment: str) -> ReportData:
    """Everything the report shows, read once from the results root. Raises
    ExperimentNotFound when the experiment has no manifest."""
    manifest = load_manifest(layout, experiment)
    rows_by_run: dict[str, dict[str, str]] = {}
    csv_found = layout.final_results(experiment).is_file()
    for row in read_final_results(layout, experiment):
        rows_by_run[row.get("run_id", "")] = row
    groups = []
    for g in manifest["groups"]:
        specs = [RunSpec.from_dict(r) for r in g["runs"]]
        first = specs[0]
        folds = []
        for spec in specs:
            state, record = fold_state(layout, spec)
            metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
            folds.append(FoldInfo(
                fold=spec.fold, run_id=spec.run_id, state=state, worker=record.get("worker"),
                started_at=as_number(record.get("started_at")), finished_at=as_number(record.get("finished_at")),
                metrics=metrics or {}, error=record.get("error") if state != DONE else None,
                attempts=[h for h in record.get("history") or [] if isinstance(h, dict)],
                recorded=record.get("status")))
        status = read_group_status(layout, first) or {}
        current = status.get("run_ids") == sorted(s.run_id for s in specs)
        groups.append(GroupInfo(
            name=g["name"], group_id=g["group_id"],
            label=f"{first.dataset.name}/{first.point}/seed={first.seed}",
            dataset=first.dataset.name, seed=first.seed, params=dict(first.params),
            state=group_state(layout, specs, [f.state for f in folds]), folds=folds,
            ensemble=layout.ensemble_files(first),
            rows=[rows_by_run[s.run_id] for s in specs if s.run_id in rows_by_run],
            status_metrics=status.get("metrics", {}) if current else {},
            failed=status.get("failed", {}) if current else {}))
    names = sorted({k for g in groups for k in g.params})
    swept = [n for n in names if len({param_key(g.params.get(n)) for g in groups}) > 1]
    return ReportData(experiment=experiment, root=layout.root, config=manifest.get("config"),
                      submitted_at=as_number(manifest.get("submitted_at")), groups=groups,
                      swept=swept, csv_path=layout.final_results(experiment),
                      csv_found=csv_found, generated_at=time.time())


def as_number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def ranked(data: ReportData, metric: str) -> list[GroupInfo]:
    """Groups with rows in final_results.csv, best first by the mean of `metric` there."""
    scored = [g for g in data.groups if g.csv_mean(metric) is not None]
    sign = -1 if METRICS[metric] else 1
    return sorted(scored, key=lambda g: (sign * (g.csv_mean(metric) or 0.0), g.name))


def missing(data: ReportData) -> list[str]:
    """One line per thing that is not (or no longer) there."""
    lines = []
    if not data.csv_found:
        lines.append(f"{data.csv_path} does not exist yet: no group has been finalized")
    for g in data.groups:
        done = sum(f.state == DONE for f in g.folds)
        if g.state != DONE:
            lines.append(f"{g.name}: group {g.state}, {done}/{len(g.folds)} folds DONE")
        if "finalize" in g.failed:
            lines.append(f"{g.name}: finalize failed: {g.failed['finalize']}")
        for f in g.folds:
            if f.state == DONE:
                continue
            if f.state == "NEW" and f.recorded == DONE:
                lines.append(f"{g.name}: fold {f.fold}: outputs missing or changed since they were written")
            elif f.state == "NEW":
                lines.append(f"{g.name}: fold {f.fold}: no status record (not started)")
            else:
                why = f": {clip_text(f.error)}" if f.error else ""
                lines.append(f"{g.name}: fold {f.fold}: {f.state}{why}")
        if g.state == DONE:
            gone = [n for n, p in g.ensemble.items() if not p.is_file()]
            if gone:
                lines.append(f"{g.name}: ensemble files missing: {', '.join(gone)}")
            if len(g.rows) < len(g.folds) and data.csv_found:
                lines.append(f"{g.name}: {len(g.rows)}/{len(g.folds)} rows in final_results.csv")
    return lines

def clip_text(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
