"""Run and group statuses, as the status files under the results root record them."""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

from .paths import Layout, atomic_write_json, read_json
from .spec import RunSpec


class Status(str, Enum):
    PENDING = "PENDING"  # submitted (or waiting for a retry), not started
    IN_PROGRESS = "IN_PROGRESS"  # a worker is training it
    DONE = "DONE"  # outputs written; for a group: finalize wrote the ensemble
    FAILED = "FAILED"  # gave up: the error says why
    CANCELLED = "CANCELLED"  # stopped on purpose; a later run resumes it

    @property
    def final(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


def read_fold_status(layout: Layout, spec: RunSpec) -> dict[str, Any] | None:
    """The fold's status record if it belongs to this very run (same run_id)."""
    data = read_json(layout.fold_status(spec))
    if not isinstance(data, dict) or data.get("run_id") != spec.run_id:
        return None
    return data


def files_intact(paths: dict[str, Path], sizes: Any) -> bool:
    """Every file exists with the size its record noted when it was written. Cheap (one
    stat each), and it turns a truncated or emptied file (a host crash before the data
    reached the disk, a user's mistake) into "run it again" instead of a broken result."""
    if not isinstance(sizes, dict) or set(sizes) != set(paths):
        return False
    for name, path in paths.items():
        try:
            if os.stat(path).st_size != sizes[name]:
                return False
        except OSError:
            return False
    return True


def file_sizes(paths: dict[str, Path]) -> dict[str, int]:
    return {name: os.stat(path).st_size for name, path in paths.items()}


def fold_state(layout: Layout, spec: RunSpec) -> tuple[str, dict[str, Any]]:
    """(state, record) from one read of the fold's status file. The state is DONE only
    when every output file is as it was written; NEW when there is no record of this
    run (or a DONE record whose files are gone); else what the record says."""
    record = read_fold_status(layout, spec) or {}
    status = record.get("status")
    if status == Status.DONE.value:
        done = files_intact(layout.fold_files(spec), record.get("files"))
        return (Status.DONE.value if done else "NEW"), record
    return (str(status) if status else "NEW"), record


def fold_is_done(layout: Layout, spec: RunSpec) -> bool:
    """DONE with this run_id, and every output file as it was written."""
    return fold_state(layout, spec)[0] == Status.DONE.value


def write_fold_status(
    layout: Layout, spec: RunSpec, status: Status, base: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Replace the fold's status file, keeping earlier fields of the same run (from
    `base` when the caller has the current record, else read from the file)."""
    previous = base if base is not None else (read_fold_status(layout, spec) or {})
    record = {
        **previous,
        "run_id": spec.run_id,
        "name": spec.name,
        "fold": spec.fold,
        "status": status.value,
        "updated_at": time.time(),
        **fields,
    }
    # Only final states must survive a host crash; a lost IN_PROGRESS/PENDING mark
    # just means the run is run again.
    atomic_write_json(layout.fold_status(spec), record, durable=status.final)
    return record


def group_record_done(layout: Layout, spec: RunSpec, record: dict[str, Any] | None,
                      run_ids: list[str]) -> bool:
    """status.json says DONE for exactly these runs, and its ensemble files are intact."""
    return (record is not None and record.get("train_status") == Status.DONE.value
            and record.get("run_ids") == run_ids
            and files_intact(layout.ensemble_files(spec), record.get("files")))


def read_group_status(layout: Layout, spec: RunSpec) -> dict[str, Any] | None:
    data = read_json(layout.group_status(spec))
    if not isinstance(data, dict) or data.get("group_id") != spec.group_id:
        return None
    return data


def reset_group_status(layout: Layout, spec: RunSpec) -> None:
    """A group whose folds will run again: its old status.json no longer describes it."""
    if read_group_status(layout, spec) is not None:
        atomic_write_json(layout.group_status(spec), {
            "group_id": spec.group_id, "experiment": spec.experiment, "name": spec.group_name,
            "train_status": Status.PENDING.value, "updated_at": time.time(),
        })


__all__ = [
    "Status",
    "file_sizes",
    "files_intact",
    "fold_is_done",
    "fold_state",
    "group_record_done",
    "read_fold_status",
    "read_group_status",
    "reset_group_status",
    "write_fold_status",
]
