"""The experiment's final_results.csv: one row per finished run, keyed by run_id.

Every finalize inserts or replaces its group's rows and rewrites the file atomically
(sorted, so a rerun writes the same bytes). The rows are kept parsed in the writing
process between calls, valid while the file is exactly as that process left it, so a
control worker finalizing hundreds of groups does not re-parse a growing CSV each time.
"""

from __future__ import annotations

import bisect
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..paths import Layout, atomic_write_text, file_lock

FIRST_COLUMNS = ["experiment", "dataset", "point", "seed", "fold", "run_id", "group_id",
                 "accuracy", "log_loss", "macro_f1", "holdout_accuracy", "seconds", "worker",
                 "device", "attempt"]


@dataclass
class _Table:
    stamp: tuple[int, ...]  # (inode, device, mtime_ns, size) as last written or read
    rows: dict[str, dict[str, str]]  # run_id -> row
    header: list[str] = field(default_factory=list)
    # Kept up to date as rows come in, so that a finalize costs no Python-level pass
    # over every row of the experiment (which made finalizing N groups quadratic in N).
    columns: set[str] = field(default_factory=set)  # every column any row has
    order: list[tuple[tuple[str, str, int, int], str]] = field(default_factory=list)  # sorted (key, run_id)
    body: list[str] = field(default_factory=list)  # CSV line for `header` of each row of `order`


_cache: dict[Path, _Table] = {}


def _stamp(path: Path) -> tuple[int, ...] | None:
    """Identifies one version of the file: every atomic write creates a new inode, so
    another writer's version never matches, even with coarse timestamps (NFS)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def read_final_results(layout: Layout, experiment: str) -> list[dict[str, str]]:
    path = layout.final_results(experiment)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _line(row: dict[str, str], header: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([row.get(c, "") for c in header])
    return buf.getvalue()


def _sort_key(row: dict[str, str]) -> tuple[str, str, int, int]:
    return (row["dataset"], row["point"], int(row["seed"]), int(row["fold"]))


def update_final_results(layout: Layout, experiment: str, rows: list[dict[str, Any]]) -> None:
    """Insert or replace rows by run_id, under a lock, and rewrite the file atomically."""
    path = layout.final_results(experiment)
    with file_lock(layout.final_results_lock(experiment)):
        stamp = _stamp(path)
        table = _cache.pop(path, None)  # back only once the file is written as it says
        if table is None or table.stamp != stamp:  # someone else wrote it: read it again
            existing = read_final_results(layout, experiment) if stamp else []
            table = _Table(stamp=stamp or (), rows={r["run_id"]: r for r in existing})
            table.columns = {k for r in table.rows.values() for k in r}
            table.order = sorted((_sort_key(r), run_id) for run_id, r in table.rows.items())
            table.body = [""] * len(table.order)  # lines written below (header [] differs)
        changed: dict[str, tuple[tuple[str, str, int, int], str]] = {}  # run_id -> its place
        for row in rows:
            cells = {k: cell_text(v) for k, v in row.items()}
            old = table.rows.get(row["run_id"])
            if old is not None:  # replaced: its place may differ
                at = bisect.bisect_left(table.order, (_sort_key(old), row["run_id"]))
                del table.order[at], table.body[at]
            entry = (_sort_key(cells), row["run_id"])
            at = bisect.bisect_right(table.order, entry)
            table.order.insert(at, entry)
            table.body.insert(at, "")
            table.rows[row["run_id"]] = cells
            table.columns.update(cells)
            changed[row["run_id"]] = entry
        header = FIRST_COLUMNS + sorted(table.columns - set(FIRST_COLUMNS))
        if header != table.header:  # a new column: every line changes
            table.header = header
            table.body = [_line(table.rows[run_id], header) for _, run_id in table.order]
        else:
            for entry in changed.values():
                table.body[bisect.bisect_left(table.order, entry)] = _line(table.rows[entry[1]], header)
        atomic_write_text(path, _line({c: c for c in header}, header) + "".join(table.body))
        table.stamp = _stamp(path) or ()
        _cache[path] = table
