"""Parameter points from a `sweep` block: grid (product), zip (aligned), random samples.

Axes combine as a product: every grid point with every zip row with every random draw.
A point's name lists only the swept values, in the order the YAML declares them.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

from .names import did_you_mean

SWEEP_KEYS = ("grid", "zip", "random")
RANDOM_KEYS = ("samples", "seed", "space")
DISTRIBUTIONS = {
    "choice": "a list of values",
    "uniform": "[low, high]",
    "loguniform": "[low, high], both > 0",
    "randint": "[low, high] integers, inclusive",
}


class SweepError(Exception):
    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))


def format_value(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"  # 0.01, 1e-05, 3 (for 3.0): readable where it is exact
        return short if float(short) == value else repr(value)
    return str(value)


def point_name(swept: dict[str, Any]) -> str:
    if not swept:
        return "base"
    return ",".join(f"{k}={format_value(v)}" for k, v in swept.items())


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def expand_points(sweep: Any, fixed: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(point name, stated params)], in a stable order; raises SweepError."""

    problems: list[tuple[str, str]] = []
    if sweep is None:
        return [("base", dict(fixed))]
    if not isinstance(sweep, dict) or not sweep:
        raise SweepError([("sweep", "must be a mapping with grid, zip and/or random")])
    for key in sweep:
        if key not in SWEEP_KEYS:
            problems.append((f"sweep.{key}", f"unknown sweep kind{did_you_mean(str(key), list(SWEEP_KEYS))}; "
                                             f"valid: {', '.join(SWEEP_KEYS)}"))
    axes: list[list[dict[str, Any]]] = []
    declared: list[str] = []

    grid = sweep.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            problems.append(("sweep.grid", "must map parameter names to lists of values"))
        else:
            for name, values in grid.items():
                if not isinstance(values, list) or not values:
                    problems.append((f"sweep.grid.{name}", f"must be a non-empty list of values, got {values!r}"))
                declared.append(str(name))
            if not problems:
                names = list(grid)
                axes.append([dict(zip(names, combo, strict=True))
                             for combo in itertools.product(*(grid[n] for n in names))])

    zipped = sweep.get("zip")
    if zipped is not None:
        if not isinstance(zipped, dict) or not zipped:
            problems.append(("sweep.zip", "must map parameter names to equally long lists"))
        else:
            lengths = {n: len(v) if isinstance(v, list) else -1 for n, v in zipped.items()}
            for name, n in lengths.items():
                if n <= 0:
                    problems.append((f"sweep.zip.{name}", "must be a non-empty list of values"))
                declared.append(str(name))
            if len(set(lengths.values())) > 1:
                problems.append(("sweep.zip", "lists must have equal lengths, got "
                                 + ", ".join(f"{n}: {v}" for n, v in lengths.items())))
            elif not problems:
                names = list(zipped)
                axes.append([dict(zip(names, row, strict=True))
                             for row in zip(*(zipped[n] for n in names), strict=True)])

    rnd = sweep.get("random")
    if rnd is not None:
        draws = _random_axis(rnd, problems, declared)
        if draws is not None:
            axes.append(draws)

    for name in {n for n in declared if declared.count(n) > 1}:
        problems.append(("sweep", f"parameter {name!r} is swept on more than one axis"))
    for name in declared:
        if name in fixed:
            problems.append((f"params.{name}", f"{name!r} is both fixed in 'params' and swept in 'sweep'"))
    if problems:
        raise SweepError(problems)

    points: list[tuple[str, dict[str, Any]]] = []
    seen: dict[str, str] = {}  # point name -> canonical JSON of its values
    for combo in itertools.product(*axes):
        swept: dict[str, Any] = {}
        for part in combo:
            swept.update(part)
        ordered = {n: swept[n] for n in declared if n in swept}
        name = point_name(ordered)
        values = json.dumps(ordered, sort_keys=True, default=repr)
        if name in seen:
            if seen[name] != values:  # e.g. 1 and 1.0, or "1" and 1: one folder for two points
                problems.append(("sweep", f"two different points are both named {name!r}; "
                                          "make their values distinguishable"))
            continue  # random draws can repeat a point
        seen[name] = values
        points.append((name, {**fixed, **ordered}))
    if problems:
        raise SweepError(problems)
    return points


def axis_keys(sweep: Any) -> dict[str, str]:
    """Key path of the axis that sweeps each parameter (for error messages)."""
    keys: dict[str, str] = {}
    if isinstance(sweep, dict):
        for kind in ("grid", "zip"):
            if isinstance(sweep.get(kind), dict):
                keys.update({str(n): f"sweep.{kind}.{n}" for n in sweep[kind]})
        rnd = sweep.get("random")
        if isinstance(rnd, dict) and isinstance(rnd.get("space"), dict):
            keys.update({str(n): f"sweep.random.space.{n}" for n in rnd["space"]})
    return keys


def _random_axis(rnd: Any, problems: list[tuple[str, str]], declared: list[str]) -> list[dict[str, Any]] | None:
    if not isinstance(rnd, dict):
        problems.append(("sweep.random", "must be a mapping {samples, seed, space}"))
        return None
    start = len(problems)
    for key in rnd:
        if key not in RANDOM_KEYS:
            problems.append((f"sweep.random.{key}", f"unknown key; valid: {', '.join(RANDOM_KEYS)}"))
    samples, seed, space = rnd.get("samples"), rnd.get("seed", 0), rnd.get("space")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= 100000:
        problems.append(("sweep.random.samples", f"must be an integer from 1 to 100000, got {samples!r}"))
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(("sweep.random.seed", f"must be an integer (the sampler's seed), got {seed!r}"))
    if not isinstance(space, dict) or not space:
        problems.append(("sweep.random.space", "must map parameter names to distributions, e.g. "
                                               "{lr: {loguniform: [0.0001, 0.1]}}"))
        return None
    for name, dist in space.items():
        key = f"sweep.random.space.{name}"
        declared.append(str(name))
        valid = ", ".join(f"{{{k}: {v}}}" for k, v in DISTRIBUTIONS.items())
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            problems.append((key, f"must be one distribution: {valid}"))
            continue
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                problems.append((key, "choice needs a non-empty list of values"))
            continue
        if not (isinstance(args, list) and len(args) == 2 and all(_num(a) for a in args) and args[0] < args[1]):
            problems.append((key, f"{kind} needs {DISTRIBUTIONS[kind]} with low < high, got {args!r}"))
        elif kind == "loguniform" and args[0] <= 0:
            problems.append((key, f"loguniform needs low > 0, got {args!r}"))
        elif kind == "randint" and not all(isinstance(a, int) for a in args):
            problems.append((key, f"randint needs integer bounds, got {args!r}"))
    if len(problems) > start:
        return None
    assert isinstance(samples, int)  # checked above
    rng = random.Random(seed)
    draws = []
    for _ in range(samples):
        draw: dict[str, Any] = {}
        for name, dist in space.items():
            kind, args = next(iter(dist.items()))
            if kind == "choice":
                draw[name] = args[rng.randrange(len(args))]
            elif kind == "uniform":
                draw[name] = float(f"{rng.uniform(args[0], args[1]):.4g}")
            elif kind == "loguniform":
                draw[name] = float(f"{math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))):.4g}")
            else:
                draw[name] = rng.randint(args[0], args[1])
        draws.append(draw)
    return draws
