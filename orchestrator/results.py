"""The experiment's final_results.csv: one row per finished run, keyed by run_id."""

from __future__ import annotations

import csv
from typing import Any

from .metrics import table_csv
from .paths import Layout, atomic_write_text, file_lock

FIRST_COLUMNS = ["experiment", "dataset", "point", "seed", "fold", "run_id", "group_id",
                 "accuracy", "log_loss", "macro_f1", "holdout_accuracy", "seconds", "worker",
                 "device", "attempt"]


def read_final_results(layout: Layout, experiment: str) -> list[dict[str, str]]:
    path = layout.final_results(experiment)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def update_final_results(layout: Layout, experiment: str, rows: list[dict[str, Any]]) -> None:
    """Insert or replace rows by run_id; rows stay sorted, so a rerun writes the same file."""
    with file_lock(layout.final_results_lock(experiment)):
        by_id = {r["run_id"]: r for r in read_final_results(layout, experiment)}
        for row in rows:
            by_id[row["run_id"]] = {k: _cell(v) for k, v in row.items()}
        params = sorted({k for r in by_id.values() for k in r if k not in FIRST_COLUMNS})
        header = FIRST_COLUMNS + params
        ordered = sorted(by_id.values(), key=lambda r: (r["dataset"], r["point"], int(r["seed"]), int(r["fold"])))
        atomic_write_text(layout.final_results(experiment),
                          table_csv(header, [[r.get(c, "") for c in header] for r in ordered]))
