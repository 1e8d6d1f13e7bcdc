"""The evolutionary search (our own, small): generations of `population` genomes, each
generation after the first made of the previous one's elites and children bred by
tournament selection, crossover and mutation. Genomes are the raw values of
orchestrator.search.space (layer count and widths, activation, dropout, space params).

Deterministic: generation g draws from a generator seeded by (seed, g), and reads only
the previous generation's members and scores, in trial-number order. A failed trial has
the worst fitness; it still counts in its generation, so no generation waits on it.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

from .asha import told
from .config import Evolution, SearchConfig
from .journal import COMPLETE, Trial
from .space import draw, log_int, random_raw, short


def rng_for(seed: int, generation: int) -> random.Random:
    return random.Random(int(hashlib.sha256(f"evolution:{seed}:{generation}".encode()).hexdigest()[:16], 16))


def fitness(cfg: SearchConfig, t: Trial) -> float:
    """Higher is better; a trial without a score is the worst. A trial pruned by ASHA
    scores its last rung value (asha.told)."""
    state, values = told(cfg, t)
    if state != COMPLETE or not values:
        return -math.inf
    return values[0] if cfg.directions[0] == "maximize" else -values[0]


def ranked(cfg: SearchConfig, members: list[Trial]) -> list[Trial]:
    """Best first; ties by trial number (the earlier first)."""
    return sorted(members, key=lambda t: (-fitness(cfg, t), t.number))


def first_generation(cfg: SearchConfig, evo: Evolution) -> list[dict[str, Any]]:
    rng = rng_for(cfg.seed, 0)
    return [random_raw(cfg, rng) for _ in range(evo.population)]


def next_generation(cfg: SearchConfig, evo: Evolution, generation: int,
                    members: list[Trial]) -> tuple[list[int], list[dict[str, Any]]]:
    """Generation `generation` from the members of the one before: (elite trial numbers,
    the children's raw values)."""
    rng = rng_for(cfg.seed, generation)
    order = ranked(cfg, members)
    elites = [t.number for t in order[: evo.elitism]]
    children = []
    for _ in range(evo.population - evo.elitism):
        a = _tournament(cfg, evo, members, rng)
        if rng.random() < evo.crossover_rate:
            child = _crossover(cfg, a.raw, _tournament(cfg, evo, members, rng).raw, rng)
        else:
            child = dict(a.raw)
        children.append(_mutate(cfg, child, evo.mutation_rate, rng))
    return elites, children


def _tournament(cfg: SearchConfig, evo: Evolution, members: list[Trial], rng: random.Random) -> Trial:
    picked = [members[rng.randrange(len(members))] for _ in range(evo.tournament)]
    return ranked(cfg, picked)[0]


def _crossover(cfg: SearchConfig, a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Uniform crossover of every key; the layer widths as one block per position."""
    return {k: (a[k] if rng.random() < 0.5 else b[k]) for k in a}


def _mutate(cfg: SearchConfig, raw: dict[str, Any], rate: float, rng: random.Random) -> dict[str, Any]:
    out = dict(raw)
    arch = cfg.architecture
    if arch is not None:
        if rng.random() < rate:  # add or remove a layer
            out["layers"] = min(arch.layers[1], max(arch.layers[0], out["layers"] + rng.choice((-1, 1))))
        for i in range(arch.layers[1]):
            if rng.random() < rate:  # halve or double a width (or draw it anew)
                w = out[f"width_{i}"] * rng.choice((0.5, 2.0)) if rng.random() < 0.7 else log_int(rng, *arch.width)
                out[f"width_{i}"] = int(min(arch.width[1], max(arch.width[0], round(w))))
        if rng.random() < rate:
            out["activation"] = rng.randrange(len(arch.activations))
        if arch.dropout is not None and rng.random() < rate:
            lo, hi = arch.dropout
            out["dropout"] = short(out["dropout"] + rng.gauss(0, (hi - lo) / 5), lo, hi)
    for d in cfg.space:
        if rng.random() >= rate:
            continue
        if d.kind in ("uniform", "loguniform") and rng.random() < 0.7:  # a step near it
            lo, hi = d.args
            if d.kind == "loguniform":
                value = math.exp(math.log(out[d.name]) + rng.gauss(0, (math.log(hi) - math.log(lo)) / 5))
            else:
                value = out[d.name] + rng.gauss(0, (hi - lo) / 5)
            out[d.name] = short(value, lo, hi)
        else:
            out[d.name] = draw(d.kind, d.args, rng)
    return out
