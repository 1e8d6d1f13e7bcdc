"""Tic-tac-toe for the built-in roles example: the rules, players, and a small value
network's forward pass in numpy (actors and evaluators need no torch).

A position is 9 cells (0 empty, 1 X, 2 O). The network scores an afterstate (the board
right after a move) for the player who made it: 18 inputs (that player's stones, the
other's), two tanh layers, one tanh output in [-1, 1] (expected result: 1 win, 0 draw,
-1 loss). A player picks the move whose afterstate scores best (exact values for
finished games), with probability `epsilon` a random one instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
HIDDEN = 64
Params = dict[str, np.ndarray]
Player = Callable[[list[int], int, np.random.Generator], int]


def winner(board: list[int]) -> int:
    """1 or 2 for a won board, 0 for none (yet)."""
    for a, b, c in LINES:
        if board[a] and board[a] == board[b] == board[c]:
            return board[a]
    return 0


def encode(board: list[int], me: int) -> np.ndarray:
    x = np.zeros(18, dtype=np.float32)
    for i, v in enumerate(board):
        if v == me:
            x[i] = 1.0
        elif v:
            x[9 + i] = 1.0
    return x


def init_params(seed: int) -> Params:
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((HIDDEN, 18)) * 0.3).astype(np.float32), "b1": np.zeros(HIDDEN, np.float32),
            "w2": (rng.standard_normal((HIDDEN, HIDDEN)) * 0.15).astype(np.float32), "b2": np.zeros(HIDDEN, np.float32),
            "w3": (rng.standard_normal((1, HIDDEN)) * 0.15).astype(np.float32), "b3": np.zeros(1, np.float32)}


def values(params: Params, x: np.ndarray) -> np.ndarray:
    h = np.tanh(x @ params["w1"].T + params["b1"])
    h = np.tanh(h @ params["w2"].T + params["b2"])
    return np.asarray(np.tanh(h @ params["w3"].T + params["b3"])[:, 0])


def to_bytes(params: Params) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **params)  # type: ignore[arg-type]
    return buf.getvalue()


def from_bytes(data: bytes | bytearray) -> Params:
    """Weights from a version's bytes (npz, never pickles: the bytes come from Redis)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: np.asarray(z[k], dtype=np.float32) for k in ("w1", "b1", "w2", "b2", "w3", "b3")}


def greedy(params: Params, epsilon: float = 0.0) -> Player:
    def play(board: list[int], me: int, rng: np.random.Generator) -> int:
        moves = [i for i, v in enumerate(board) if not v]
        if epsilon and rng.random() < epsilon:
            return int(moves[rng.integers(len(moves))])
        scores = np.empty(len(moves), dtype=np.float32)
        open_rows: list[int] = []
        feats: list[np.ndarray] = []
        for k, m in enumerate(moves):
            board[m] = me
            if winner(board) == me:
                scores[k] = 1.0
            elif len(moves) == 1:
                scores[k] = 0.0
            else:
                open_rows.append(k)
                feats.append(encode(board, me))
            board[m] = 0
        if feats:
            scores[open_rows] = values(params, np.stack(feats))
        best = np.flatnonzero(scores >= scores.max() - 1e-6)
        return int(moves[int(best[rng.integers(len(best))])])

    return play


def random_player(board: list[int], me: int, rng: np.random.Generator) -> int:
    moves = [i for i, v in enumerate(board) if not v]
    return int(moves[rng.integers(len(moves))])


def play_game(x: Player, o: Player, rng: np.random.Generator,
              record: list[tuple[list[int], int]] | None = None) -> int:
    """Play one game, X first; returns the winner (0: a draw). `record` gets each
    afterstate and who moved."""
    board = [0] * 9
    me = 1
    for _ in range(9):
        m = (x if me == 1 else o)(board, me, rng)
        if board[m]:
            raise ValueError(f"illegal move {m}")
        board[m] = me
        if record is not None:
            record.append((list(board), me))
        if (w := winner(board)) != 0:
            return w
        me = 3 - me
    return 0


def self_play(params: Params, games: int, epsilon: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Samples {x: afterstate features, z: result for whoever moved} of `games` games."""
    player = greedy(params, epsilon)
    samples: list[dict[str, Any]] = []
    for _ in range(games):
        record: list[tuple[list[int], int]] = []
        w = play_game(player, player, rng, record)
        for board, mover in record:
            z = 0.0 if w == 0 else (1.0 if w == mover else -1.0)
            samples.append({"b": board, "m": mover, "z": z})
    return samples


def match(a: Player, b: Player, games: int, rng: np.random.Generator) -> dict[str, float]:
    """`a` against `b`, half the games as X: a's win, draw and loss rates."""
    won = drawn = 0
    for g in range(games):
        if g % 2 == 0:
            w, me = play_game(a, b, rng), 1
        else:
            w, me = play_game(b, a, rng), 2
        won += w == me
        drawn += w == 0
    return {"win": won / games, "draw": drawn / games, "loss": (games - won - drawn) / games}
