"""Loading datasets (scikit-learn's bundled ones, CSV files) and splitting them.

Every split is seeded by the run's seed, so all folds of a group see the same holdout
and the same fold assignment, on any worker.

A CSV path comes from a broker message, which is untrusted: the file is opened without
blocking and checked on the opened descriptor (a regular file, not a FIFO, a device or a
socket; at most ORCH_DATASET_MAX_MB), read once, and parsed only if those very bytes have
the hash the experiment was submitted with.
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .. import settings
from ..errors import DatasetError
from .spec import BUILTIN_DATASETS, DatasetRef, RunSpec

if TYPE_CHECKING:  # numpy is imported where data is loaded: validating a config needs none
    import numpy as np

BUILTIN = BUILTIN_DATASETS
# Class sizes of the bundled datasets (fixed data), so that validating a config does not
# import scikit-learn just to count them. tests/test_spec_and_sweep.py checks them.
BUILTIN_CLASS_COUNTS: dict[str, dict[str, int]] = {
    "iris": {"setosa": 50, "versicolor": 50, "virginica": 50},
    "wine": {"class_0": 59, "class_1": 71, "class_2": 48},
    "breast_cancer": {"malignant": 212, "benign": 357},
    "digits": dict(zip("0123456789", (178, 182, 177, 183, 181, 182, 181, 179, 174, 180), strict=True)),
}


@dataclass(frozen=True, eq=False)  # hashed by identity: the lru caches below key on it
class Table:
    X: np.ndarray  # float32, (n_samples, n_features)
    y: np.ndarray  # int64 class indices
    classes: tuple[str, ...]
    features: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # row indices
    val: np.ndarray
    holdout: np.ndarray


def max_bytes() -> int:
    """The largest CSV dataset a process reads (ORCH_DATASET_MAX_MB, in MiB)."""
    return int(float(settings.value("ORCH_DATASET_MAX_MB")) * 2**20)


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _size(n: int | float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{int(n)} bytes"


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str], limit: int | None = None) -> tuple[BinaryIO, os.stat_result]:
    """Open `path` for reading if it is a regular file of at most `limit` bytes (default
    `max_bytes()`): DatasetError otherwise, at once. The check is on the opened
    descriptor, so a name swapped between a check and the open cannot slip through, and
    O_NONBLOCK makes opening a FIFO that has no writer return instead of waiting for one."""
    limit = max_bytes() if limit is None else limit
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # what open() says of a socket
            raise DatasetError(f"{path} is a socket, not a regular file; a dataset must be a "
                               "regular CSV file") from None
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatasetError(f"{path} is {_kind(info.st_mode)}, not a regular file; a dataset "
                               "must be a regular CSV file")
        if info.st_size > limit:
            raise DatasetError(f"{path} is {_size(info.st_size)}, over the limit of {_size(limit)} for a "
                               "dataset (ORCH_DATASET_MAX_MB)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most `limit` bytes (`open_regular`); a file that
    grows past the limit while it is read is refused too."""
    limit = max_bytes() if limit is None else limit
    fh, info = open_regular(path, limit)
    with fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise DatasetError(f"{path} grew past the limit of {_size(limit)} for a dataset "
                           "(ORCH_DATASET_MAX_MB) while it was read")
    return data, info


def file_sha256(path: Path) -> str:
    """The content hash of a regular file (`open_regular`), read in blocks."""
    limit = max_bytes()
    digest, size = hashlib.sha256(), 0
    fh, _ = open_regular(path, limit)
    with fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            size += len(block)
            if size > limit:
                raise DatasetError(f"{path} grew past the limit of {_size(limit)} for a "
                                   "dataset (ORCH_DATASET_MAX_MB) while it was read")
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _builtin(name: str) -> Table:
    import numpy as np
    from sklearn import datasets as skd

    loader = {
        "iris": skd.load_iris, "wine": skd.load_wine,
        "breast_cancer": skd.load_breast_cancer, "digits": skd.load_digits,
    }[name]
    bunch = loader()
    names = [str(n) for n in getattr(bunch, "target_names", np.unique(bunch.target))]
    return Table(
        X=np.asarray(bunch.data, dtype=np.float32), y=np.asarray(bunch.target, dtype=np.int64),
        classes=tuple(names), features=tuple(str(f) for f in bunch.feature_names),
    )


def _parse_csv(data: bytes, path: str, target: str) -> Table:
    import numpy as np

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{path}: the CSV file is empty") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}:1: {exc}") from None
    if target not in header:
        raise DatasetError(f"{path}: no column {target!r} (columns: {', '.join(header)[:2000]})")
    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    rows, labels = [], []
    line_no = 1
    try:
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DatasetError(f"{path}:{line_no}: {len(row)} fields, header has {len(header)}")
            labels.append(row[t])
            values = []
            for i, cell in enumerate(row):
                if i == t:
                    continue
                try:
                    values.append(float(cell))
                except ValueError:
                    raise DatasetError(
                        f"{path}:{line_no}: column {header[i]!r} has non-numeric value {cell[:100]!r}"
                    ) from None
            rows.append(values)
    except csv.Error as exc:  # e.g. a field over csv's size limit, a NUL byte
        raise DatasetError(f"{path}:{line_no + 1}: {exc}") from None
    if len(rows) < 2:
        raise DatasetError(f"{path}: needs at least 2 data rows, has {len(rows)}")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return Table(
        X=np.asarray(rows, dtype=np.float32),
        y=np.asarray([index[v] for v in labels], dtype=np.int64),
        classes=tuple(classes), features=tuple(features),
    )


# Parsed CSVs by (path, target, device, inode, mtime, size) of the file as opened: a
# worker reads a group's dataset once for all its folds. Each entry keeps the hash of
# the bytes it was parsed from.
_TABLES: OrderedDict[tuple[object, ...], tuple[str, Table]] = OrderedDict()
_TABLES_KEPT = 8


def load(ref: DatasetRef, verify: bool = True) -> Table:
    """Load a dataset; for a CSV, check it is still the file that was submitted."""
    if ref.source == "sklearn":
        if ref.name not in BUILTIN:
            raise DatasetError(f"unknown built-in dataset {ref.name!r} (valid: {', '.join(BUILTIN)})")
        return _builtin(ref.name)
    assert ref.path is not None and ref.target is not None
    path = ref.path
    where = f"dataset {ref.name!r} at {path}"
    try:
        fh, info = open_regular(path)
    except DatasetError as exc:
        raise DatasetError(f"dataset {ref.name!r}: {exc}") from None
    with fh:
        key = (path, ref.target, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        hit = _TABLES.get(key)
        if hit is None:
            limit = max_bytes()
            data = fh.read(limit + 1)
            if len(data) > limit:
                raise DatasetError(f"cannot read {where}: it grew past the limit of "
                                   f"{_size(limit)} (ORCH_DATASET_MAX_MB) while it was read")
            sha = hashlib.sha256(data).hexdigest()
    if hit is not None:
        sha = hit[0]
    if verify and ref.sha256 and sha != ref.sha256:
        raise DatasetError(
            f"{where} changed since the experiment was submitted "
            "(its content hash differs); submit the experiment again"
        )
    if hit is None:
        hit = (sha, _parse_csv(data, path, ref.target))
        _TABLES[key] = hit
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(key)
    return hit[1]


def split(table: Table, spec: RunSpec) -> Split:
    """Holdout first (same for every fold of the group), then the fold or the split."""
    return _all_splits(table, spec.seed, spec.k, spec.validation, spec.holdout)[spec.fold]


def warm_up() -> None:
    """scikit-learn's one-time work of a process, done now: a worker's main process calls
    this before it forks its pool, so no pool process does it in its first run (on GPU
    workers, every run is a pool process's first). That is importing the dataset loaders
    (with scipy.io), and what the first split's input checks do once: list every
    installed package's entry points (narwhals plugins). A first run in a forked child
    took 95 ms without this, 35-45 ms with it (iris, `prior`)."""
    import numpy as np
    import sklearn.datasets  # noqa: F401  (_builtin)
    from sklearn.model_selection import StratifiedKFold, train_test_split

    y = np.array([0, 1] * 4)
    train_test_split(np.arange(8), test_size=0.5, stratify=y, random_state=0)
    next(StratifiedKFold(n_splits=2).split(np.zeros((8, 1)), y))


@functools.lru_cache(maxsize=64)
def _all_splits(table: Table, seed: int, k: int | None, validation: float | None,
                holdout_fraction: float) -> tuple[Split, ...]:
    """Every fold of one group at once: a worker computes the assignment once per group.
    (`table` is cached per dataset, so its identity is a valid cache key.)"""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold, train_test_split

    idx = np.arange(len(table.y))
    rest, holdout = idx, np.array([], dtype=np.int64)
    if holdout_fraction > 0:
        rest, holdout = train_test_split(idx, test_size=holdout_fraction, stratify=table.y,
                                         random_state=seed)
    holdout = np.sort(holdout)
    if k is not None:
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        pairs = [(rest[t], rest[v]) for t, v in folds.split(rest, table.y[rest])]
    else:
        pairs = [tuple(train_test_split(rest, test_size=validation, stratify=table.y[rest],
                                        random_state=seed))]
    return tuple(Split(train=np.sort(t), val=np.sort(v), holdout=holdout) for t, v in pairs)


def class_counts(ref: DatasetRef) -> dict[str, int]:
    """Samples per class; for built-in datasets without loading them."""
    if ref.source == "sklearn" and ref.name in BUILTIN_CLASS_COUNTS:
        return BUILTIN_CLASS_COUNTS[ref.name]
    import numpy as np

    table = load(ref, verify=False)
    counts = np.bincount(table.y, minlength=len(table.classes))
    return {c: int(n) for c, n in zip(table.classes, counts, strict=True)}
