"""Group finalization (the chord body) and group failure (the chord error callback).

Plain Python over the files of a group's folds. Idempotent: a group whose status.json
already says DONE for the same runs is left untouched, and every other write replaces
a file with the same content.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from typing import Any

import numpy as np

from ..experiment.spec import RunSpec
from ..livestate import LiveState
from ..paths import Layout, atomic_write_json, atomic_write_text
from .metrics import csv_cells, prob_text, scores, table_csv
from .results import update_final_results
from .status import (
    FoldPaths,
    Status,
    file_sizes,
    fold_paths,
    fold_state,
    group_record_done,
    load_json,
    read_group_status,
    write_fold_status,
)


class GroupNotReady(RuntimeError):
    """finalize was called while a fold of the group is not DONE."""


FoldStates = list[tuple[str, dict[str, Any]]]


def group_paths(layout: Layout, specs: list[RunSpec]) -> list[FoldPaths]:
    """Each fold's status file and output files (status.fold_paths), in the order of
    `specs`: built once per finalize and handed to what reads them (Path objects cost
    more to build than the reads and stats that use them)."""
    return [fold_paths(layout, s) for s in specs]


def fold_states(layout: Layout, specs: list[RunSpec], paths: list[FoldPaths] | None = None) -> FoldStates:
    """Each fold's (state, record) (status.fold_state), one read of its status file.
    `paths`: group_paths(layout, specs), if the caller has them."""
    if paths is None:
        return [fold_state(layout, s) for s in specs]
    return [fold_state(layout, s, p) for s, p in zip(specs, paths, strict=True)]


def _read_probs(path: Any, fold: int, oof_rows: list[tuple[int, int, list[float]]],
                hold_index: list[int], hold_rows: list[list[float]]) -> tuple[list[str], int, int]:
    """Appends the fold's validation rows to `oof_rows` and its holdout rows to
    `hold_index`/`hold_rows`, in one pass; returns (classes, validation rows, holdout
    rows). Each row parsed (and failing) as before: index, split, then probabilities."""
    n_oof, n_hold = len(oof_rows), len(hold_rows)
    add_oof, add_index, add_hold = oof_rows.append, hold_index.append, hold_rows.append
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        for r in reader:
            index, split, probs = int(r[0]), r[1], list(map(float, r[2:]))
            if split == "val":
                add_oof((index, fold, probs))
            else:
                add_index(index)
                add_hold(probs)
    return header[2:], len(oof_rows) - n_oof, len(hold_rows) - n_hold


def _read_truth(path: Any, truth: dict[int, str]) -> None:
    """index -> y_true of predictions.csv, found by column name (csv.DictReader's rules:
    the last column of a name, blank lines skipped)."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        columns = {name: i for i, name in enumerate(next(reader, []))}
        index, y_true = columns["index"], columns["y_true"]
        for r in reader:
            if r:
                truth[int(r[index])] = r[y_true]


def _check_width(probs: np.ndarray, n_classes: int, spec: RunSpec) -> np.ndarray:
    """Rows of one value per class (a ragged table already failed in np.array)."""
    if probs.shape[1:] != (n_classes,):
        raise ValueError(f"{spec.group_name}: probabilities.csv rows without one value per class")
    return probs


def finalize_group(layout: Layout, specs: list[RunSpec], live: LiveState | None = None,
                   states: FoldStates | None = None,
                   paths: list[FoldPaths] | None = None) -> dict[str, Any]:
    """Write the ensemble outputs, final_results.csv rows and status.json DONE.

    `states`: each fold's fold_state, in the order of `specs`, if the caller has just
    read them (tasks.finalize, after collecting), else read here. `paths`: as for
    fold_states."""
    first = specs[0]
    run_ids = sorted(s.run_id for s in specs)
    status_path = layout.group_status(first)
    existing = read_group_status(layout, first, status_path)
    if group_record_done(layout, first, existing, run_ids):
        assert existing is not None
        if live:
            live.set_group(first.experiment, first.group_id, Status.DONE.value)
        return existing
    if live:
        live.count_finalize(first.experiment, first.group_id)
    if paths is None:
        paths = group_paths(layout, specs)
    if states is None:
        states = fold_states(layout, specs, paths)
    missing = [s.fold for s, (state, _) in zip(specs, states, strict=True) if state != Status.DONE.value]
    if missing:
        raise GroupNotReady(f"{first.group_name}: folds {missing} are not DONE")

    classes: list[str] = []
    truth: dict[int, str] = {}
    oof_rows: list[tuple[int, int, list[float]]] = []
    hold_index: list[int] = []
    hold_rows: list[list[float]] = []
    fold_metrics: list[dict[str, float]] = []
    metas: dict[int, dict[str, Any]] = {}
    for spec, (_, files) in sorted(zip(specs, paths, strict=True), key=lambda sp: sp[0].fold):
        meta = load_json(files["metadata.json"]) or {}
        classes, n_val, n_hold = _read_probs(files["probabilities.csv"], spec.fold, oof_rows,
                                             hold_index, hold_rows)
        _read_truth(files["predictions.csv"], truth)
        if (classes != meta.get("classes") or n_val != meta.get("n_val")
                or n_hold != meta.get("n_holdout")):
            raise ValueError(f"fold {spec.fold}: its outputs do not match its metadata.json "
                             f"(classes, validation or holdout rows): {files['probabilities.csv']}")
        metas[spec.fold] = meta
        fold_metrics.append(meta.get("metrics", {}))

    n_classes = len(classes)
    cls_index = {c: i for i, c in enumerate(classes)}
    oof_rows.sort()
    oof_probs = np.array([p for _, _, p in oof_rows]) if oof_rows else np.zeros((0, n_classes))
    _check_width(oof_probs, n_classes, first)
    oof_y = np.array([cls_index[truth[i]] for i, _, _ in oof_rows], dtype=np.int64)
    # The fold ensemble: each holdout row's sum over the folds, added in fold order
    # (np.add.at adds repeated indices one after another), divided by the fold count.
    hold_idx, where = np.unique(np.array(hold_index, dtype=np.int64), return_inverse=True)
    hold_probs = np.zeros((len(hold_idx), n_classes))
    if hold_rows:
        np.add.at(hold_probs, where, _check_width(np.array(hold_rows), n_classes, first))
        hold_probs /= len(specs)
    hold_keys = hold_idx.tolist()
    hold_y = np.array([cls_index[truth[i]] for i in hold_keys], dtype=np.int64)

    # The tables as metrics.table_csv writes them: class names quoted as csv.writer
    # quotes them, the other cells (numbers) never need it.
    text, cell = prob_text(n_classes), csv_cells(classes)
    files = layout.ensemble_files(first)
    oof_pred = oof_probs.argmax(axis=1).tolist() if oof_rows else []
    atomic_write_text(files["oof_predictions.csv"], table_csv(
        ["index", "fold", "y_true", "y_pred", *classes], []) + "".join([
            f"{i},{f},{cell[truth[i]]},{cell[classes[k]]}{text(*p)}\n"
            for (i, f, p), k in zip(oof_rows, oof_pred, strict=True)]))
    hold_pred = hold_probs.argmax(axis=1).tolist() if hold_keys else []
    atomic_write_text(files["holdout_predictions.csv"], table_csv(
        ["index", "y_true", "y_pred", *classes], []) + "".join([
            f"{i},{cell[truth[i]]},{cell[classes[k]]}{text(*p)}\n"
            for i, k, p in zip(hold_keys, hold_pred, hold_probs.tolist(), strict=True)]))
    names = sorted({k for m in fold_metrics for k in m})
    fold_summary = {
        k: {"mean": float(np.mean([m[k] for m in fold_metrics if k in m])),
            "std": float(np.std([m[k] for m in fold_metrics if k in m]))}
        for k in names
    }
    metrics = {"oof": scores(oof_y, oof_probs), "ensemble_holdout": scores(hold_y, hold_probs),
               "folds": fold_summary, "n_folds": len(specs), "classes": classes,
               "reported": reported_means([metas[s.fold].get("last_report") for s in specs])}
    atomic_write_json(files["metrics.json"], metrics)

    update_final_results(layout, first.experiment, [_row(s, metas[s.fold]) for s in specs])
    record = {
        "group_id": first.group_id, "experiment": first.experiment, "name": first.group_name,
        "train_status": Status.DONE.value, "run_ids": run_ids,
        "folds": {str(s.fold): Status.DONE.value for s in specs}, "failed": {},
        "metrics": {"oof": metrics["oof"], "ensemble_holdout": metrics["ensemble_holdout"],
                    "reported": metrics["reported"]},
        "files": file_sizes(files), "finished_at": time.time(),
    }
    atomic_write_json(status_path, record)
    clear_staging(layout, first)
    if live:
        live.set_group(first.experiment, first.group_id, Status.DONE.value)
    return record


def reported_means(reports: list[Any]) -> dict[str, float]:
    """The mean over folds of each number the trainer reported last (metadata.json's
    last_report), for the names every fold reported: what a search's `reported.<name>`
    metric reads (the objective trainer's `score`, say)."""
    found = [r for r in reports if isinstance(r, dict)]
    if not found or len(found) != len(reports):
        return {}
    names = set.intersection(*({k for k, v in r.items() if isinstance(v, int | float)
                                and not isinstance(v, bool)} for r in found))
    return {k: float(np.mean([float(r[k]) for r in found])) for k in sorted(names)}


def clear_staging(layout: Layout, spec: RunSpec) -> None:
    """At the group's end: what attempts killed while writing (or fenced) left in its
    staging folder, and the folder itself, and the temporary files of status writes cut
    short by a kill (paths.atomic_write_bytes), so no hidden partial file outlives the
    group. Every fold has ended by now; a zombie still writing cannot commit anyway."""
    shutil.rmtree(layout.staging_root(spec), ignore_errors=True)
    for folder in (layout.status_dir(spec), layout.ensemble_dir(spec)):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def _row(spec: RunSpec, meta: dict[str, Any]) -> dict[str, Any]:
    metrics = meta.get("metrics", {})
    hold = meta.get("holdout_metrics", {})
    row = {
        "experiment": spec.experiment, "dataset": spec.dataset.name, "point": spec.point,
        "seed": spec.seed, "fold": spec.fold, "run_id": spec.run_id, "group_id": spec.group_id,
        "accuracy": metrics.get("accuracy"), "log_loss": metrics.get("log_loss"),
        "macro_f1": metrics.get("macro_f1"), "holdout_accuracy": hold.get("accuracy"),
        "seconds": meta.get("training_seconds"), "worker": meta.get("worker"),
        "device": meta.get("device"), "attempt": meta.get("attempt"),
    }
    for name, value in sorted(spec.params.items()):
        row[f"param.{name}"] = value
    return row


LOST = ("did not finish: the process training it died or its message was lost "
        "(see the worker's log)")


def mark_group_failed(layout: Layout, specs: list[RunSpec], reason: str | None = None,
                      live: LiveState | None = None, states: FoldStates | None = None) -> dict[str, Any]:
    """status.json FAILED, naming which folds failed and why (the chord error callback).

    Called once every fold has reported, so a fold that is not DONE or FAILED now was
    lost (its process was killed): it is marked FAILED with that reason. `reason`
    (a finalize that failed) is recorded under the key "finalize". `states`: as for
    finalize_group.
    """
    first = specs[0]
    existing = read_group_status(layout, first)
    if group_record_done(layout, first, existing, sorted(s.run_id for s in specs)):
        # A finished group stays finished: a late (or forged) error callback of it
        # changes nothing.
        assert existing is not None
        return existing
    folds: dict[str, str] = {}
    failed: dict[str, str] = {}
    for spec, (state, record) in zip(specs, states or fold_states(layout, specs), strict=True):
        status = record.get("status", Status.PENDING.value)
        if state == Status.DONE.value:
            status = Status.DONE.value
        elif status not in (Status.FAILED.value, Status.CANCELLED.value):
            status = Status.FAILED.value
            record = write_fold_status(layout, spec, Status.FAILED, base=record or None,
                                       error=LOST, finished_at=time.time())
        folds[str(spec.fold)] = status
        if status != Status.DONE.value:
            failed[str(spec.fold)] = record.get("error") or LOST
    if not reason:  # the error callback after a finalize that recorded why it failed
        previous = read_group_status(layout, first) or {}
        if previous.get("run_ids") == sorted(s.run_id for s in specs):
            reason = previous.get("failed", {}).get("finalize")
    if reason or not failed:
        failed["finalize"] = reason or "finalize did not complete (see the control worker's log)"
    # Cancelled on purpose (and nothing failed): CANCELLED, which a later run resumes.
    cancelled = (not reason and Status.CANCELLED.value in folds.values()
                 and Status.FAILED.value not in folds.values())
    if cancelled:
        failed.pop("finalize", None)
    state = Status.CANCELLED if cancelled else Status.FAILED
    record = {
        "group_id": first.group_id, "experiment": first.experiment, "name": first.group_name,
        "train_status": state.value, "run_ids": sorted(s.run_id for s in specs),
        "folds": folds, "failed": failed, "finished_at": time.time(),
    }
    atomic_write_json(layout.group_status(first), record)
    clear_staging(layout, first)
    if live:
        live.set_group(first.experiment, first.group_id, state.value)
    return record
