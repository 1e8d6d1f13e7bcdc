"""Run and group statuses, as the status files under the results root record them."""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from ..experiment.spec import RunSpec
from ..paths import Layout, atomic_write_json, read_json

# (a fold's status file, its output files by name): Layout.fold_status and fold_files,
# built once by a caller that reads them more than once (finalize).
FoldPaths = tuple[Path, dict[str, Path]]

# Digits as zeros: a run of 19 is a search of a bytes string (a regex took 5x longer).
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


class Status(str, Enum):
    PENDING = "PENDING"  # submitted (or waiting for a retry), not started
    IN_PROGRESS = "IN_PROGRESS"  # a worker is training it
    DONE = "DONE"  # outputs written; for a group: finalize wrote the ensemble
    FAILED = "FAILED"  # gave up: the error says why
    CANCELLED = "CANCELLED"  # stopped on purpose; a later run resumes it

    @property
    def final(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


def load_json(path: Path) -> Any | None:
    """paths.read_json's result (None when unreadable or not JSON), at about half its
    cost: orjson parses the file when it can; whatever orjson refuses (NaN, values out
    of float range, lone surrogates, invalid JSON or UTF-8) or may read otherwise (an
    integer of 19 digits or more: a float to orjson) goes through read_json itself."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if _LONG_NUMBER not in data.translate(_DIGITS):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return read_json(path)


def read_fold_status(layout: Layout, spec: RunSpec, path: Path | None = None) -> dict[str, Any] | None:
    """The fold's status record if it belongs to this very run (same run_id). `path`:
    layout.fold_status(spec), if the caller has it."""
    data = load_json(path or layout.fold_status(spec))
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


def fold_paths(layout: Layout, spec: RunSpec) -> FoldPaths:
    return layout.fold_status(spec), layout.fold_files(spec)


def fold_state(layout: Layout, spec: RunSpec, paths: FoldPaths | None = None) -> tuple[str, dict[str, Any]]:
    """(state, record) from one read of the fold's status file. The state is DONE only
    when every output file is as it was written; NEW when there is no record of this
    run (or a DONE record whose files are gone); else what the record says. `paths`:
    fold_paths(layout, spec), if the caller has them."""
    record = read_fold_status(layout, spec, paths[0] if paths else None) or {}
    status = record.get("status")
    if status == Status.DONE.value:
        done = files_intact(paths[1] if paths else layout.fold_files(spec), record.get("files"))
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


def read_group_status(layout: Layout, spec: RunSpec, path: Path | None = None) -> dict[str, Any] | None:
    """`path`: layout.group_status(spec), if the caller has it."""
    data = load_json(path or layout.group_status(spec))
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
    "FoldPaths",
    "Status",
    "file_sizes",
    "files_intact",
    "fold_is_done",
    "fold_paths",
    "fold_state",
    "group_record_done",
    "load_json",
    "read_fold_status",
    "read_group_status",
    "reset_group_status",
    "write_fold_status",
]
