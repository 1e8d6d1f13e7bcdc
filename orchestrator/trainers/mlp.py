"""The built-in MLP classifier in PyTorch for tabular data.

torch is imported inside `train`, so that registering this trainer (in the CLI, in a
worker's parent process) never imports torch or touches CUDA (design invariant 5,
docs/reliability.md).
"""

from __future__ import annotations

import time
from typing import Any

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
    first, resumed = 1, None
    if ctx.dist is not None:  # data-parallel: every rank starts from rank 0's checkpoint
        state = _load_checkpoint(ctx.dist)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng"])
            first = resumed = int(state["epoch"]) + 1
    for epoch in range(first, int(p["epochs"]) + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        total = 0.0
        for i in range(0, n, bs):
            batch = order[i : i + bs]
            opt.zero_grad(set_to_none=True)
            if ctx.dist is None:
                loss = loss_fn(model(X_dev[batch]), y_dev[batch])
                loss.backward()
                total += float(loss.detach()) * len(batch)
            else:
                total += _data_parallel_step(ctx.dist, model, X_dev, y_dev, batch)
            opt.step()
        loss_value = total / n
        ctx.reporter.report(epoch=epoch, train_loss=loss_value)
        if (ctx.dist is not None and ctx.dist.rank == 0 and epoch % ctx.dist.checkpoint_every == 0
                and epoch < int(p["epochs"])):
            _save_checkpoint(ctx.dist, {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                                        "generator": generator.get_state(), "rng": torch.get_rng_state()})
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(X_eval), dim=1).double().cpu().numpy()
    return TrainResult(
        probabilities=np.asarray(probs),
        params_count=sum(int(t.numel()) for t in model.parameters()),
        info={"final_train_loss": loss_value, "fit_seconds": time.perf_counter() - start,
              **({"ranks": ctx.dist.world, "backend": ctx.dist.backend, "resumed_from_epoch": resumed}
                 if ctx.dist is not None else {})},
    )


def _data_parallel_step(dist_info: Any, model: Any, X: Any, y: Any, batch: Any) -> float:
    """One step of the global batch `batch`, this rank's share of it (every world-th row,
    as DistributedSampler deals them): the loss summed over its rows and divided by the
    global batch size, the gradients summed over all ranks in one all-reduce. So the
    step is the single-process step on the same batch (up to float summation order),
    whatever the number of ranks. Returns the batch's summed loss (all ranks)."""
    import torch
    import torch.distributed as tdist
    from torch import nn

    mine = batch[dist_info.rank :: dist_info.world]
    params = list(model.parameters())
    if len(mine):
        loss_sum = nn.functional.cross_entropy(model(X[mine]), y[mine], reduction="sum")
        (loss_sum / len(batch)).backward()
        loss_part = loss_sum.detach().reshape(1)
    else:  # a last batch smaller than the world: this rank adds nothing
        loss_part = torch.zeros(1, device=X.device)
    grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
    flat = torch.cat([*(g.reshape(-1) for g in grads), loss_part])
    tdist.all_reduce(flat)
    offset = 0
    for q in params:
        size = q.numel()
        q.grad = flat[offset : offset + size].view_as(q).clone()
        offset += size
    return float(flat[-1])


def _save_checkpoint(dist_info: Any, state: dict[str, Any]) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    dist_info.save(buf.getvalue())


def _load_checkpoint(dist_info: Any) -> dict[str, Any] | None:
    """Rank 0 reads the last checkpoint and broadcasts it: ranks on hosts without the
    results root resume from the same state."""
    import io

    import torch
    import torch.distributed as tdist

    state = None
    if dist_info.rank == 0 and (raw := dist_info.load()) is not None:
        state = torch.load(io.BytesIO(raw), weights_only=True)
    box = [state]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def preload() -> None:
    """torch's imports and the optimizer's first use, on the CPU (CUDA stays
    uninitialised). A process's first AdamW imports torch._dynamo: 4-7 s on a loaded
    2-core host. Paid by one rank of a data-parallel gang and not by its peer, it held
    that rank's first collective past the peer's collective timeout."""
    import torch

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


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
