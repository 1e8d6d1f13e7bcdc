"""A trivial baseline: predicts the class frequencies of the training rows.

Useful as a floor to compare real models against, and as a near-zero-cost trainer for
measuring the orchestrator's own overhead (benchmarks/dispatch.py).
"""

from __future__ import annotations

from .base import Param, TrainContext, Trainer, TrainResult


def train(ctx: TrainContext) -> TrainResult:
    import numpy as np  # here: registering the trainer (config validation) needs none

    counts = np.bincount(ctx.y_train, minlength=ctx.n_classes).astype(np.float64)
    smoothing = float(ctx.params["smoothing"])
    probs = (counts + smoothing) / (counts.sum() + smoothing * ctx.n_classes)
    ctx.reporter.report(epoch=1)
    return TrainResult(probabilities=np.tile(probs, (len(ctx.X_eval), 1)), params_count=ctx.n_classes)


TRAINER = Trainer(
    name="prior", version="1", fn=train,
    params={"smoothing": Param(1.0, "float", minimum=0.0, help="additive (Laplace) smoothing")},
    description="class-prior baseline (no learning)",
)
