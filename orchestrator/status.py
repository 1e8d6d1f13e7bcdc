"""Run and group statuses, as the status files under the results root record them."""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

from .paths import FOLD_FILES, Layout, atomic_write_json, read_json
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


def fold_is_done(layout: Layout, spec: RunSpec) -> bool:
    """DONE with this run_id, and every output file present."""
    data = read_fold_status(layout, spec)
    if not data or data.get("status") != Status.DONE.value:
        return False
    return all(p.exists() for p in layout.fold_files(spec).values())


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
    "FOLD_FILES",
    "Status",
    "fold_is_done",
    "read_fold_status",
    "read_group_status",
    "reset_group_status",
    "write_fold_status",
]
