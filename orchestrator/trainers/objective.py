"""A cheap objective for testing search strategies on a CPU: its score is a known
function of its parameters and its epoch budget, plus seeded noise.

    quality(x, y, kind) = exp(-((x - 1)^2 + (y + 2)^2) / 4) * KIND[kind]   (best: x=1, y=-2, kind=c: 1)
    score(epoch)        = quality * epoch / (epoch + 2) + noise * N(0, 1)

The noise is drawn from a generator seeded by the run's seed, fold and scoring parameters, so
the same run always scores the same. It reports `score` at every epoch (what ASHA
compares), finalize records the mean of the folds' last reports as `reported.score`,
and its predictions are the class frequencies of the training rows (as `prior`).
`seconds` sleeps per epoch (a run a test can kill); `fail_above` raises when x is
above it (a failing trial).
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from .base import Param, TrainContext, Trainer, TrainResult

KIND = {"a": 0.8, "b": 0.9, "c": 1.0}
OPTIMUM = {"x": 1.0, "y": -2.0, "kind": "c"}


def quality(x: float, y: float, kind: str = "c") -> float:
    return math.exp(-((x - 1) ** 2 + (y + 2) ** 2) / 4) * KIND[kind]


def expected_score(x: float, y: float, kind: str, epochs: int) -> float:
    """The score without its noise: what a strategy should find the maximum of."""
    return quality(x, y, kind) * epochs / (epochs + 2)


def train(ctx: TrainContext) -> TrainResult:
    import numpy as np

    p = ctx.params
    if float(p["x"]) > float(p["fail_above"]):
        raise ValueError(f"objective: x={p['x']} is above fail_above={p['fail_above']} (a deliberate failure)")
    # The noise depends on what the score does (not on `seconds` or `fail_above`), so a
    # slowed-down copy of a search scores exactly as the original.
    key = json.dumps({"params": {k: p[k] for k in ("x", "y", "kind", "epochs", "noise")},
                      "seed": ctx.seed, "fold": ctx.fold}, sort_keys=True, default=str)
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))
    base = quality(float(p["x"]), float(p["y"]), str(p["kind"]))
    for epoch in range(1, int(p["epochs"]) + 1):
        if p["seconds"]:
            time.sleep(float(p["seconds"]))
        score = base * epoch / (epoch + 2) + float(p["noise"]) * float(rng.standard_normal())
        ctx.reporter.report(epoch=epoch, score=score)
    counts = np.bincount(ctx.y_train, minlength=ctx.n_classes).astype(np.float64) + 1.0
    probs = counts / counts.sum()
    return TrainResult(probabilities=np.tile(probs, (len(ctx.X_eval), 1)), params_count=ctx.n_classes,
                       info={"quality": base})


TRAINER = Trainer(
    name="objective", version="1", fn=train,
    params={
        "x": Param(0.0, "float", minimum=-10.0, maximum=10.0),
        "y": Param(0.0, "float", minimum=-10.0, maximum=10.0),
        "kind": Param("a", "str", choices=tuple(KIND)),
        "epochs": Param(20, "int", minimum=1, maximum=100000),
        "noise": Param(0.01, "float", minimum=0.0),
        "seconds": Param(0.0, "float", minimum=0.0, help="sleep per epoch"),
        "fail_above": Param(1e9, "float", help="raise when x is above it"),
    },
    description="known function of its params and epochs plus seeded noise (for testing searches)",
)
