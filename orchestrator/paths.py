"""The on-disk layout under the results root, and the one atomic-write helper.

Nothing else in the project joins result path strings. Layout (docs/results.md):

    <root>/<experiment>/experiment.json          manifest of the last submission
    <root>/<experiment>/final_results.csv        one row per finished run
    <root>/<output>/<point>/seed=<seed>/         one group (all folds of a point+seed)
        fold_<i>/predictions.csv probabilities.csv ranks.csv metadata.json
        ensemble/oof_predictions.csv holdout_predictions.csv metrics.json
        status/fold_<i>.json status.json
    <root>/<experiment>/search/search.json journal.jsonl   a search's config and records
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from . import settings
from .errors import SettingError, UnsafeNameError
from .experiment.names import check_name, check_relative_path
from .experiment.spec import RunSpec

FOLD_FILES = ("predictions.csv", "probabilities.csv", "ranks.csv", "metadata.json")
ENSEMBLE_FILES = ("oof_predictions.csv", "holdout_predictions.csv", "metrics.json")

# Durability: rename is atomic against a crashed process; fsync also survives a crashed
# host (a GPU driver panic) at the price of a disk flush per file.
def _fsync() -> bool:
    try:
        return bool(settings.value("ORCH_FSYNC"))
    except SettingError:  # every entry point refuses it first (settings.check_all)
        return True


FSYNC = _fsync()


_counter = itertools.count()


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one.

    `durable=False` skips the fsync for records a host crash may lose harmlessly
    (an IN_PROGRESS mark: losing it only means the run is run again).
    """
    # Unique per process and call; O_EXCL guards against any leftover of the same name.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{next(_counter)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if FSYNC and durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), durable)


_JSON_OPTIONS = (orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
                 | orjson.OPT_SERIALIZE_NUMPY)


def json_bytes(data: Any) -> bytes:
    """`data` as the project's JSON files hold it: indented by 2, keys sorted, a final
    newline. orjson writes it 20x faster than the json module's indenting encoder (which
    is pure Python); what orjson does not take (keys that are not strings, say) goes
    through json with the same layout. Non-finite floats become null (valid JSON)."""
    try:
        return orjson.dumps(data, option=_JSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: an unsupported type
        return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def atomic_write_json(path: Path, data: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, json_bytes(data), durable)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` survive a host crash (when ORCH_FSYNC is on)."""
    if FSYNC:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range() if FSYNC else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing a file's data to the disk now, without waiting for it (Linux's
    sync_file_range; elsewhere nothing). Several files written this way and fsynced
    afterwards (fsync_folder) reach the disk in one journal commit instead of one each."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_folder(path: Path) -> None:
    """Make a folder of freshly written files survive a host crash (when ORCH_FSYNC is
    on): fsync each file in it, then the folder itself."""
    if FSYNC:
        for entry in os.scandir(path):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(path)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None if it cannot be read (missing, not a file, no
    permission) or is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (for read-modify-write of shared files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class Layout:
    """Paths of everything under one results root."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        self._resolved: dict[str, Path] = {}
        # (group folder, fold) -> (fold dir, status file, output files): a run asks for
        # them several times (a Path join costs ~7 us); valid while _inside's entry is.
        self._folds: dict[tuple[str, int], tuple[Path, Path, dict[str, Path]]] = {}

    def _inside(self, rel: str) -> Path:
        """root/rel, checked to stay inside the root (symlinks included); cached, since
        every file of a run lives in the same few folders."""
        path = self._resolved.get(rel)
        if path is None:
            check_relative_path(rel, "path")
            path = (self.root / rel).resolve()
            if not path.is_relative_to(self.root):
                raise UnsafeNameError(f"path {rel!r} leaves the results root")
            if len(self._resolved) > 10000:
                self._resolved.clear()
                self._folds.clear()
            self._resolved[rel] = path
        return path

    # experiment level
    def experiment_dir(self, experiment: str) -> Path:
        return self._inside(check_name(experiment, "experiment"))

    def manifest(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "experiment.json"

    def manifest_lock(self, experiment: str) -> Path:
        """Held while evaluations are added to the manifest (dispatch.manifest.add_to_manifest)."""
        return self.experiment_dir(experiment) / ".experiment.lock"

    def paused_marker(self, experiment: str) -> Path:
        """Present while the experiment is paused (`orchestrator pause`)."""
        return self.experiment_dir(experiment) / "paused.json"

    def final_results(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "final_results.csv"

    def final_results_lock(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / ".final_results.lock"

    # a search's records (orchestrator.search)
    def search_dir(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "search"

    def search_config(self, experiment: str) -> Path:
        """The search block and the trial template of the last submission."""
        return self.search_dir(experiment) / "search.json"

    def search_journal(self, experiment: str) -> Path:
        """Proposals, publications and results, one JSON entry per line."""
        return self.search_dir(experiment) / "journal.jsonl"

    def search_lock(self, experiment: str) -> Path:
        return self.search_dir(experiment) / ".step.lock"

    # group level
    def group_root(self, group_dir: str) -> Path:
        """A group folder given as the manifest records it (relative to the root)."""
        return self._inside(group_dir)

    def group_dir(self, spec: RunSpec) -> Path:
        return self._inside(spec.group_dir)

    def status_dir(self, spec: RunSpec) -> Path:
        return self.group_dir(spec) / "status"

    def group_status(self, spec: RunSpec) -> Path:
        return self.status_dir(spec) / "status.json"

    def ensemble_dir(self, spec: RunSpec) -> Path:
        return self.group_dir(spec) / "ensemble"

    # fold level
    def _fold(self, spec: RunSpec) -> tuple[Path, Path, dict[str, Path]]:
        key = (spec.group_dir, spec.fold)
        found = self._folds.get(key)
        if found is None:
            group = self.group_dir(spec)
            base = group / f"fold_{spec.fold}"
            found = (base, group / "status" / f"fold_{spec.fold}.json",
                     {name: base / name for name in FOLD_FILES})
            if len(self._folds) > 2000:
                self._folds.clear()
            self._folds[key] = found
        return found

    def fold_dir(self, spec: RunSpec) -> Path:
        return self._fold(spec)[0]

    def staging_root(self, spec: RunSpec) -> Path:
        """The group's hidden folder of attempts' staging folders (removed at its end)."""
        return self.group_dir(spec) / ".staging"

    def staging_dir(self, spec: RunSpec, tag: str) -> Path:
        """Where an attempt writes a fold's outputs before it commits them (one rename of
        the folder): hidden, so no partial file is ever at an output's name."""
        return self.staging_root(spec) / f"fold_{spec.fold}.{check_name(tag, 'attempt tag')}"

    def checkpoint(self, spec: RunSpec) -> Path:
        """A data-parallel run's last checkpoint (rank 0 writes it; a relaunch resumes)."""
        return self.group_dir(spec) / ".checkpoints" / f"fold_{spec.fold}.pt"

    def logs_dir(self, spec: RunSpec) -> Path:
        return self.group_dir(spec) / "logs"

    def run_log(self, spec: RunSpec, attempt: int) -> Path:
        """stdout and stderr of one attempt of a run."""
        return self.logs_dir(spec) / f"fold_{spec.fold}.attempt_{attempt}.log"

    def fold_status(self, spec: RunSpec) -> Path:
        return self._fold(spec)[1]

    def fold_files(self, spec: RunSpec) -> dict[str, Path]:
        return dict(self._fold(spec)[2])

    def ensemble_files(self, spec: RunSpec) -> dict[str, Path]:
        base = self.ensemble_dir(spec)
        return {name: base / name for name in ENSEMBLE_FILES}
