"""The built-in MLP classifier in PyTorch for tabular data.

torch is imported inside `train`, so that registering this trainer (in the CLI, in a
worker's parent process) never imports torch or touches CUDA (design invariant 5,
docs/reliability.md).
"""

from __future__ import annotations

import time

from .. import settings
from .base import Param, TrainContext, Trainer, TrainResult

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "leaky_relu")


def train(ctx: TrainContext) -> TrainResult:
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(int(settings.value("ORCH_TORCH_THREADS")))
    if ctx.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this worker was started for a GPU but CUDA is not available")
    device = torch.device(ctx.device)
    p = ctx.params
    torch.manual_seed(ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)

    # Standardise with training statistics only.
    mean = ctx.X_train.mean(axis=0)
    std = ctx.X_train.std(axis=0)
    std[std == 0] = 1.0
    X = torch.tensor((ctx.X_train - mean) / std, dtype=torch.float32)
    y = torch.tensor(ctx.y_train, dtype=torch.long)
    X_eval = torch.tensor((ctx.X_eval - mean) / std, dtype=torch.float32, device=device)

    hidden = p["hidden"] if isinstance(p["hidden"], list) else [p["hidden"]]
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
           "leaky_relu": nn.LeakyReLU}[p["activation"]]
    layers: list[nn.Module] = []
    width = X.shape[1]
    for h in hidden:
        layers += [nn.Linear(width, h), act()]
        if p["dropout"] > 0:
            layers.append(nn.Dropout(p["dropout"]))
        width = h
    layers.append(nn.Linear(width, ctx.n_classes))
    model = nn.Sequential(*layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    loss_fn = nn.CrossEntropyLoss()

    X_dev, y_dev = X.to(device), y.to(device)
    n, bs = len(y), int(p["batch_size"])
    start = time.perf_counter()
    loss_value = float("nan")
    for epoch in range(1, int(p["epochs"]) + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for i in range(0, n, bs):
            batch = order[i : i + bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X_dev[batch]), y_dev[batch])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        loss_value = total / n
        ctx.reporter.report(epoch=epoch, train_loss=loss_value)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(X_eval), dim=1).double().cpu().numpy()
    return TrainResult(
        probabilities=np.asarray(probs),
        params_count=sum(int(t.numel()) for t in model.parameters()),
        info={"final_train_loss": loss_value, "fit_seconds": time.perf_counter() - start},
    )


def preload() -> None:
    import torch  # noqa: F401  (imports only: CUDA stays uninitialised)


TRAINER = Trainer(
    name="mlp", version="1", fn=train, preload=preload, ranks=True,
    params={
        "hidden": Param([64], "int_list", minimum=1, help="hidden layer widths, e.g. [64, 32]"),
        "activation": Param("relu", "str", choices=ACTIVATIONS),
        "dropout": Param(0.0, "float", minimum=0.0, maximum=0.95),
        "lr": Param(0.01, "float", minimum=1e-8, maximum=10.0, help="AdamW learning rate"),
        "epochs": Param(100, "int", minimum=1),
        "batch_size": Param(32, "int", minimum=1),
        "weight_decay": Param(0.0, "float", minimum=0.0),
    },
    description="multi-layer perceptron classifier (PyTorch, AdamW, cross-entropy)",
)
