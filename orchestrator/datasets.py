"""Loading datasets (scikit-learn's bundled ones, CSV files) and splitting them.

Every split is seeded by the run's seed, so all folds of a group see the same holdout
and the same fold assignment, on any worker.
"""

from __future__ import annotations

import csv
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .spec import DatasetRef, RunSpec

BUILTIN = ("iris", "wine", "breast_cancer", "digits")


@dataclass(frozen=True)
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _builtin(name: str) -> Table:
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


@functools.lru_cache(maxsize=8)
def _csv(path: str, target: str, mtime_ns: int, size: int) -> Table:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path}: the CSV file is empty") from None
        if target not in header:
            raise DatasetError(f"{path}: no column {target!r} (columns: {', '.join(header)})")
        t = header.index(target)
        features = [h for i, h in enumerate(header) if i != t]
        rows, labels = [], []
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
                        f"{path}:{line_no}: column {header[i]!r} has non-numeric value {cell!r}"
                    ) from None
            rows.append(values)
    if len(rows) < 2:
        raise DatasetError(f"{path}: needs at least 2 data rows, has {len(rows)}")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return Table(
        X=np.asarray(rows, dtype=np.float32),
        y=np.asarray([index[v] for v in labels], dtype=np.int64),
        classes=tuple(classes), features=tuple(features),
    )


def load(ref: DatasetRef, verify: bool = True) -> Table:
    """Load a dataset; for a CSV, check it is still the file that was submitted."""
    if ref.source == "sklearn":
        if ref.name not in BUILTIN:
            raise DatasetError(f"unknown built-in dataset {ref.name!r} (valid: {', '.join(BUILTIN)})")
        return _builtin(ref.name)
    assert ref.path is not None and ref.target is not None
    path = Path(ref.path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {ref.name!r} at {path}: {exc.strerror}") from None
    if verify and ref.sha256 and _cached_sha(str(path), stat.st_mtime_ns, stat.st_size) != ref.sha256:
        raise DatasetError(
            f"dataset {ref.name!r} at {path} changed since the experiment was submitted "
            "(its content hash differs); submit the experiment again"
        )
    return _csv(str(path), ref.target, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cached_sha(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(Path(path))


def split(table: Table, spec: RunSpec) -> Split:
    """Holdout first (same for every fold of the group), then the fold or the split."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    n = len(table.y)
    idx = np.arange(n)
    rest, holdout = idx, np.array([], dtype=np.int64)
    if spec.holdout > 0:
        rest, holdout = train_test_split(
            idx, test_size=spec.holdout, stratify=table.y, random_state=spec.seed
        )
    if spec.k is not None:
        folds = StratifiedKFold(n_splits=spec.k, shuffle=True, random_state=spec.seed)
        train_pos, val_pos = list(folds.split(rest, table.y[rest]))[spec.fold]
        train, val = rest[train_pos], rest[val_pos]
    else:
        train, val = train_test_split(
            rest, test_size=spec.validation, stratify=table.y[rest], random_state=spec.seed
        )
    return Split(train=np.sort(train), val=np.sort(val), holdout=np.sort(holdout))


def smallest_class(table: Table) -> tuple[str, int]:
    counts = np.bincount(table.y, minlength=len(table.classes))
    i = int(np.argmin(counts))
    return table.classes[i], int(counts[i])
