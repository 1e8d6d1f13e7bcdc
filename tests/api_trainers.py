"""Function trainers for tests/test_api.py, registered on workers through
ORCH_TRAINER_MODULES=tests.api_trainers (the `@orch.trainer` way, no Trainer object)."""

from __future__ import annotations

from typing import Any

import orchestrator as orch


@orch.trainer("centroid_fn", params={"temperature": 1.0, "tag": "x"})
def centroid(ctx: orch.TrainContext) -> Any:
    """A nearest-centroid classifier: returns the class probabilities as an array."""
    import numpy as np

    means = np.stack([ctx.X_train[ctx.y_train == c].mean(axis=0) for c in range(ctx.n_classes)])
    logits = -((ctx.X_eval[:, None, :] - means[None]) ** 2).sum(axis=2) / ctx.params["temperature"]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    ctx.reporter.report(epoch=1)
    return probs / probs.sum(axis=1, keepdims=True)
