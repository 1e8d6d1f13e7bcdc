"""From a search config's space to values: a strategy's raw values (what Optuna's
distributions or a genome hold) and the trainer params a trial trains with.

Floats are kept to 4 significant digits (as sweep.random does): folder names stay
readable, and two proposals that differ below that are one point, trained once.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ..experiment.sweep import point_name
from .config import SearchConfig


def short(value: float, low: float, high: float) -> float:
    """4 significant digits, kept inside [low, high]."""
    return min(high, max(low, float(f"{value:.4g}")))


def trainer_params(cfg: SearchConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """A strategy's raw values -> trainer params, in cfg.names order. Raw keys:
    `layers` (n), `width_<i>`, `activation`, `dropout` for an architecture; each space
    name (a choice by its index)."""
    out: dict[str, Any] = {}
    arch = cfg.architecture
    if arch is not None:
        out["hidden"] = [int(raw[f"width_{i}"]) for i in range(int(raw["layers"]))]
        out["activation"] = arch.activations[int(raw["activation"])]
        if arch.dropout is not None:
            out["dropout"] = short(float(raw["dropout"]), *arch.dropout)
    for d in cfg.space:
        v = raw[d.name]
        if d.kind == "choice":
            out[d.name] = d.args[int(v)]
        elif d.kind == "randint":
            out[d.name] = int(v)
        else:
            out[d.name] = short(float(v), d.args[0], d.args[1])
    return out


def name_of(params: dict[str, Any]) -> str:
    """The trial's point name (its folder): its values in cfg.names order."""
    return point_name(params)


def random_raw(cfg: SearchConfig, rng: random.Random) -> dict[str, Any]:
    """Raw values drawn uniformly (log-uniformly for loguniform and widths)."""
    raw: dict[str, Any] = {}
    arch = cfg.architecture
    if arch is not None:
        raw["layers"] = rng.randint(*arch.layers)
        for i in range(arch.layers[1]):
            raw[f"width_{i}"] = log_int(rng, *arch.width)
        raw["activation"] = rng.randrange(len(arch.activations))
        if arch.dropout is not None:
            raw["dropout"] = short(rng.uniform(*arch.dropout), *arch.dropout)
    for d in cfg.space:
        raw[d.name] = draw(d.kind, d.args, rng)
    return raw


def log_int(rng: random.Random, low: int, high: int) -> int:
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def draw(kind: str, args: tuple[Any, ...], rng: random.Random) -> Any:
    if kind == "choice":
        return rng.randrange(len(args))
    if kind == "randint":
        return rng.randint(args[0], args[1])
    if kind == "loguniform":
        return short(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))), args[0], args[1])
    return short(rng.uniform(args[0], args[1]), args[0], args[1])


def optuna_distributions(cfg: SearchConfig) -> dict[str, Any]:
    """The same raw keys as Optuna distributions (every width is always sampled, so the
    space is fixed; a trial with fewer layers ignores the rest)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, Any] = {}
    arch = cfg.architecture
    if arch is not None:
        dists["layers"] = IntDistribution(*arch.layers)
        for i in range(arch.layers[1]):
            dists[f"width_{i}"] = IntDistribution(*arch.width, log=arch.width[0] < arch.width[1])
        dists["activation"] = CategoricalDistribution(tuple(range(len(arch.activations))))
        if arch.dropout is not None:
            dists["dropout"] = FloatDistribution(*arch.dropout)
    for d in cfg.space:
        if d.kind == "choice":
            dists[d.name] = CategoricalDistribution(tuple(range(len(d.args))))
        elif d.kind == "randint":
            dists[d.name] = IntDistribution(d.args[0], d.args[1])
        else:
            dists[d.name] = FloatDistribution(d.args[0], d.args[1], log=d.kind == "loguniform")
    return dists
