"""The built-in roles example: tic-tac-toe learned by self-play (configs/roles/tictactoe.yaml).

- `tictactoe.actor`: plays `games` self-play games at a time with the latest weights
  (epsilon-greedy over the value network's afterstate scores) and adds every afterstate
  with the game's result to the experience stream.
- `tictactoe.learner`: reads the stream into a replay buffer, takes one training step
  (PyTorch, mean squared error against the results) per `new_per_step` new samples,
  publishes the weights every `publish_every` steps (acknowledging the samples it
  trained on with them), and ends the experiment at `steps`. It resumes from the last
  published version.
- `tictactoe.evaluator`: plays every published version, in order, against a random
  player and against the best version before it; records win, draw and loss rates per
  version, and marks the best version (the weight store keeps it).

torch is imported by the learner only, inside its function: worker start, `submit`
and the other roles never load it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..trainers.base import Param
from . import ttt_game as game
from .evaluation import evaluate_each
from .role import Role
from .weights import Version

log = logging.getLogger(__name__)
MAX_SAMPLES_READ = 2048


def _valid(sample: Any) -> tuple[list[int], int, float] | None:
    """A sample from the stream (untrusted JSON) or None."""
    if not isinstance(sample, dict):
        return None
    b, m, z = sample.get("b"), sample.get("m"), sample.get("z")
    if (not isinstance(b, list) or len(b) != 9 or not all(type(v) is int and 0 <= v <= 2 for v in b)
            or m not in (1, 2) or z not in (-1.0, 0.0, 1.0, -1, 0, 1)):
        return None
    return b, int(m), float(z)


def learner(ctx: Any) -> None:
    import torch

    s = ctx.settings
    torch.manual_seed(ctx.spec.seed)
    torch.set_num_threads(1)
    device = torch.device("cuda" if ctx.device == "cuda" and torch.cuda.is_available() else "cpu")
    net = torch.nn.Sequential(torch.nn.Linear(18, game.HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(game.HIDDEN, game.HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(game.HIDDEN, 1), torch.nn.Tanh()).to(device)
    layers: tuple[Any, ...] = (net[0], net[2], net[4])
    names = (("w1", "b1"), ("w2", "b2"), ("w3", "b3"))

    def load(params: game.Params) -> None:
        with torch.no_grad():
            for layer, (w, b) in zip(layers, names, strict=True):
                layer.weight.copy_(torch.from_numpy(params[w]))
                layer.bias.copy_(torch.from_numpy(params[b]))

    def params() -> game.Params:
        out: game.Params = {}
        for layer, (w, b) in zip(layers, names, strict=True):
            out[w] = layer.weight.detach().cpu().numpy().copy()
            out[b] = layer.bias.detach().cpu().numpy().copy()
        return out

    current = ctx.weights.fetch()
    step = 0
    if current is not None:
        load(game.from_bytes(current.data))
        step = current.step
        log.info("learner resumes from version %d (step %d)", current.number, step)
    else:
        load(game.init_params(ctx.spec.seed))
        ctx.publish(game.to_bytes(params()), step=0)
    opt = torch.optim.Adam(net.parameters(), lr=float(s["lr"]))
    rng = np.random.default_rng(ctx.spec.seed + 1000 * ctx.attempt)
    xs = np.zeros((int(s["replay"]), 18), np.float32)
    zs = np.zeros(int(s["replay"]), np.float32)
    filled = cursor = 0
    pending: list[str] = []
    new = consumed = 0
    reader = ctx.experience.reader(f"{ctx.spec.role}.{ctx.spec.index}")
    version = ctx.weights.latest()
    while ctx.running() and step < int(s["steps"]):
        for entry in reader.read(count=MAX_SAMPLES_READ, block_ms=200):
            pending.append(entry.id)
            got = _valid(entry.sample)
            if got is None:
                continue
            xs[cursor], zs[cursor] = game.encode(got[0], got[1]), got[2]
            cursor = (cursor + 1) % len(xs)
            filled = min(filled + 1, len(xs))
            new += 1
            consumed += 1
        while new >= int(s["new_per_step"]) and step < int(s["steps"]) and ctx.running():
            new -= int(s["new_per_step"])
            idx = rng.integers(0, filled, int(s["batch"]))
            x, z = torch.from_numpy(xs[idx]).to(device), torch.from_numpy(zs[idx]).to(device)
            loss = ((net(x)[:, 0] - z) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % int(s["publish_every"]) == 0 or step == int(s["steps"]):
                version = ctx.publish(game.to_bytes(params()), step=step, ack_ids=pending)
                reader.acknowledged(pending)
                pending = []
        ctx.beat("running", steps=step, samples=consumed, version=version)
    if step >= int(s["steps"]) and ctx.running():
        ctx.end(f"the learner reached its step budget ({step} steps)")


def actor(ctx: Any) -> None:
    s = ctx.settings
    rng = np.random.default_rng(ctx.spec.seed * 1000 + ctx.spec.index * 7 + ctx.attempt)
    version: int | None = None
    params: game.Params | None = None
    games = samples = 0
    while ctx.running():
        if not ctx.wait_unpaused():
            break
        latest = ctx.weights.latest()
        if latest is not None and latest != version:
            got = ctx.weights.fetch()
            if got is not None:
                version, params = got.number, game.from_bytes(got.data)
        if params is None:
            ctx.weights.wait_newer(None, timeout=1.0, stop=lambda: not ctx.running())
            ctx.beat("waiting for weights")
            continue
        batch = game.self_play(params, int(s["games"]), float(s["epsilon"]), rng)
        while ctx.running():
            if not ctx.wait_unpaused():
                return
            if ctx.experience.add(batch, wait=1.0, stop=lambda: not ctx.running()):
                games += int(s["games"])
                samples += len(batch)
                break
            ctx.beat("waiting: stream full", games=games, samples=samples, version=version)
        ctx.beat("running", games=games, samples=samples, version=version)


def evaluator(ctx: Any) -> None:
    """Scores every version it owes, in order (orchestrator.roles.evaluation): against a
    random player, and against the best of the versions scored before it."""
    import time

    s = ctx.settings
    rng = np.random.default_rng(ctx.spec.seed * 1000 + 500 + ctx.spec.index + 7919 * ctx.attempt)
    n = int(s["games"])
    best_seen: tuple[int, game.Params] | None = None

    def score(version: Version) -> tuple[dict[str, Any], float]:
        nonlocal best_seen
        best = ctx.weights.best()
        if best is not None and best[0] != version.number and (best_seen is None or best_seen[0] != best[0]):
            got = ctx.weights.fetch(best[0])  # the best is kept whatever `keep` says
            best_seen = (best[0], game.from_bytes(got.data)) if got is not None else None
        params = game.from_bytes(version.data)
        vs_random = game.match(game.greedy(params), game.random_player, n, rng)
        row: dict[str, Any] = {"step": version.step, "games": n, "win_random": vs_random["win"],
                               "draw_random": vs_random["draw"], "loss_random": vs_random["loss"]}
        if best is not None and best_seen is not None and best_seen[0] == best[0] != version.number:
            vs_best = game.match(game.greedy(params, 0.1), game.greedy(best_seen[1], 0.1), int(s["games_best"]), rng)
            row.update(win_best=vs_best["win"], draw_best=vs_best["draw"], loss_best=vs_best["loss"],
                       best_version=best[0])
        row["evaluated_at"] = time.time()
        log.info("version %d (step %d): vs random %s", version.number, version.step, vs_random)
        return row, vs_random["win"] + vs_random["draw"]

    evaluate_each(ctx, score)


ROLES = [
    Role("tictactoe.learner", "learner", learner, {
        "steps": Param(300, "int", minimum=1, maximum=10_000_000, help="step budget: the experiment ends there"),
        "publish_every": Param(10, "int", minimum=1, help="publish the weights every N steps"),
        "batch": Param(256, "int", minimum=1, maximum=65536),
        "lr": Param(0.003, "float", minimum=1e-6, maximum=1.0),
        "replay": Param(20000, "int", minimum=100, maximum=10_000_000, help="replay buffer (samples)"),
        "new_per_step": Param(64, "int", minimum=1, help="new samples consumed per training step"),
    }, "trains the value network on the actors' games"),
    Role("tictactoe.actor", "actor", actor, {
        "games": Param(32, "int", minimum=1, maximum=100_000, help="self-play games per batch added"),
        "epsilon": Param(0.2, "float", minimum=0.0, maximum=1.0, help="exploration: a random move this often"),
    }, "plays self-play games with the latest weights"),
    Role("tictactoe.evaluator", "evaluator", evaluator, {
        "games": Param(200, "int", minimum=2, maximum=100_000, help="games against a random player per version"),
        "games_best": Param(100, "int", minimum=2, maximum=100_000, help="games against the best version"),
    }, "scores each version against a random player and the best version"),
]
