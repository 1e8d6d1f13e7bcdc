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
from typing import TYPE_CHECKING

from .errors import DatasetError
from .spec import DatasetRef, RunSpec

if TYPE_CHECKING:  # numpy is imported where data is loaded: validating a config needs none
    import numpy as np

BUILTIN = ("iris", "wine", "breast_cancer", "digits")
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
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


@functools.lru_cache(maxsize=8)
def _csv(path: str, target: str, mtime_ns: int, size: int) -> Table:
    import numpy as np

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
