"""Classification metrics and the CSV tables of per-sample outputs."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    if len(y_true) == 0:
        return {}
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    clipped = np.clip(probs, 1e-15, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "log_loss": float(log_loss(y_true, clipped, labels=list(range(n_classes)))),
        "macro_f1": float(f1_score(y_true, pred, average="macro", labels=list(range(n_classes)),
                                   zero_division=0)),
    }


def ranks(probs: np.ndarray) -> np.ndarray:
    """Per row, each class's rank by probability: 1 is the most probable."""
    order = np.argsort(-probs, axis=1, kind="stable")
    out = np.empty_like(order)
    rows = np.arange(probs.shape[0])[:, None]
    out[rows, order] = np.arange(1, probs.shape[1] + 1)
    return out


def table_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)
