"""`orchestrator status`: experiments, groups and folds as the files record them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..collect.status import Status, fold_state, read_group_status
from ..dispatch.manifest import load_manifest
from ..execution.transfer import RETURNED
from ..experiment.plan import has_status_dir
from ..experiment.spec import RunSpec
from ..paths import Layout, read_json

# run_key -> the fold's status record kept in Redis by a worker without the results root,
# with "returned": whether its outputs wait there (orchestrator.execution.returns.Returns.records).
InFlight = Callable[[list[RunSpec]], dict[str, dict[str, Any]]]


def group_state(layout: Layout, specs: list[RunSpec], fold_states: list[str]) -> str:
    return _group_state(read_group_status(layout, specs[0]), specs, fold_states)


def _group_state(record: dict[str, Any] | None, specs: list[RunSpec], fold_states: list[str]) -> str:
    """group_state, given the group's status.json (read_group_status)."""
    if record and record.get("run_ids") == sorted(s.run_id for s in specs):
        return str(record["train_status"])
    if {Status.IN_PROGRESS.value, Status.DONE.value, RETURNED} & set(fold_states):
        return Status.IN_PROGRESS.value
    if Status.CANCELLED.value in fold_states:
        return Status.CANCELLED.value
    return Status.PENDING.value


def fold_view(layout: Layout, spec: RunSpec, in_flight: dict[str, dict[str, Any]],
              recorded: bool = True) -> tuple[str, dict[str, Any]]:
    """(state, record) of a fold: its status file, unless a worker without the results
    root has a newer mark of it in Redis (IN_PROGRESS, FAILED...; RETURNED: its outputs
    wait there for the control worker). `recorded`: False when the caller knows that
    the group has no status folder (has_status_dir), so no file to read."""
    state, record = fold_state(layout, spec) if recorded else ("NEW", {})
    remote = in_flight.get(spec.run_key)
    if remote is None or state == Status.DONE.value:
        return state, record
    if remote.get("returned"):
        return RETURNED, remote
    newer = float(remote.get("updated_at") or 0) > float(record.get("updated_at") or 0)
    if remote.get("status") not in (None, Status.DONE.value) and newer:
        return str(remote["status"]), remote
    return state, record


def experiment_status(layout: Layout, experiment: str, with_files: bool = False,
                      in_flight: InFlight | None = None) -> dict[str, Any]:
    """`in_flight` (a lookup in the cluster's Redis) adds what workers without the
    results root report about folds not yet written there."""
    manifest = load_manifest(layout, experiment)
    now = time.time()
    groups_out = []
    run_counts: Counter[str] = Counter()
    group_counts: Counter[str] = Counter()
    # Each spec parsed (and its run_key hashed) once: 100,000 runs cost ~3 s a time.
    by_group = [[RunSpec.from_dict(r) for r in g["runs"]] for g in manifest["groups"]]
    remote = in_flight([s for specs in by_group for s in specs]) if in_flight else {}
    for g, specs in zip(manifest["groups"], by_group, strict=True):
        # Every record of a group (its folds', its own) is in its status folder: a group
        # not started has none, and one stat replaces a failed open per fold and two more.
        recorded = has_status_dir(layout, specs[0])
        group_record = read_group_status(layout, specs[0]) if recorded else None
        folds = []
        for spec in specs:
            state, record = fold_view(layout, spec, remote, recorded)
            started, finished = record.get("started_at"), record.get("finished_at")
            elapsed = record.get("elapsed")
            if elapsed is None and started and state == Status.IN_PROGRESS.value:
                elapsed = now - started
            fold: dict[str, Any] = {
                "fold": spec.fold, "run_id": spec.run_id, "run_key": spec.run_key, "name": spec.name,
                "state": state,
                "worker": record.get("worker"), "attempt": record.get("attempt"),
                "elapsed": None if elapsed is None else round(float(elapsed), 2),
                "error": record.get("error") if state != Status.DONE.value else None,
                "finished_at": finished,
            }
            if spec.resources.ranks > 1:  # a data-parallel run: `status` adds its ranks
                fold["ranks"] = spec.resources.ranks
            if with_files:
                fold["files"] = {k: str(v) for k, v in layout.fold_files(spec).items()}
                fold["status_file"] = str(layout.fold_status(spec))
            folds.append(fold)
            run_counts[state] += 1
        state = _group_state(group_record, specs, [f["state"] for f in folds])
        group_counts[state] += 1
        entry: dict[str, Any] = {"group_id": g["group_id"], "name": g["name"], "state": state,
                                 "counts": dict(Counter(f["state"] for f in folds)), "folds": folds}
        record = group_record or {}
        if record.get("metrics"):
            entry["metrics"] = record["metrics"]
        if record.get("failed"):
            entry["failed"] = record["failed"]
        if with_files:
            entry["dir"] = str(layout.group_dir(specs[0]))
            entry["status_file"] = str(layout.group_status(specs[0]))
            entry["ensemble_files"] = {k: str(v) for k, v in layout.ensemble_files(specs[0]).items()}
        groups_out.append(entry)
    out: dict[str, Any] = {
        "experiment": experiment, "config": manifest.get("config"),
        "runs": dict(run_counts), "groups": dict(group_counts), "group_details": groups_out,
        "paused": paused if isinstance(paused := read_json(layout.paused_marker(experiment)), dict) else None,
    }
    if layout.search_config(experiment).exists():
        from .search import search_status

        out["search"] = search_status(layout, experiment)
    if with_files:
        out["final_results"] = str(layout.final_results(experiment))
        out["manifest"] = str(layout.manifest(experiment))
        out["results_root"] = str(layout.root)
    return out


def group_summaries(layout: Layout, experiment: str) -> list[dict[str, Any]]:
    """Per group of the last submission: state, fold counts, metrics, failed folds.

    Reads one status.json per group (not every fold's file): what `run` and `submit
    --wait` print at the end.
    """
    out = []
    for g in load_manifest(layout, experiment)["groups"]:
        run_ids = g["run_ids"]
        record = read_json(layout.group_root(g["dir"]) / "status" / "status.json") or {}
        current = record.get("group_id") == g["group_id"] and record.get("run_ids") == run_ids
        folds = record.get("folds", {}) if current else {}
        out.append({
            "name": g["name"], "group_id": g["group_id"],
            "state": record.get("train_status", Status.PENDING.value) if current else Status.PENDING.value,
            "folds": len(g["runs"]), "done": sum(v == Status.DONE.value for v in folds.values()),
            "metrics": record.get("metrics", {}) if current else {},
            "failed": record.get("failed", {}) if current else {},
        })
    return out
