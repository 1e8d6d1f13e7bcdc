"""The `search:` block of an experiment YAML, validated into a frozen SearchConfig.

Every problem is collected with its key path and what would be valid (the caller turns
them into one ConfigError, exit 2). The config is also stored with the search's records
(`to_dict` / `from_dict`), so the control side needs no YAML file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..experiment.names import did_you_mean
from ..experiment.sweep import DISTRIBUTIONS

STRATEGIES = ("random", "tpe", "cmaes", "nsga2", "evolution")
MODES = ("batch", "async")
ASYNC_STRATEGIES = ("random", "tpe")  # the others are generational by nature
SEARCH_KEYS = {
    "strategy": f"one of {', '.join(STRATEGIES)} (required)",
    "metric": "a metric finalize records, e.g. oof.accuracy (a list for nsga2)",
    "direction": "maximize or minimize (a list for nsga2)",
    "trials": "how many trials (not for evolution: population and generations say it)",
    "parallel": "trials in flight at once (default 4)",
    "seed": "the strategy's seed (default 0)",
    "mode": "batch (default: deterministic) or async (random, tpe: fill free slots at once; the default with asha)",
    "max_failed_trials": "the search stops once more trials than this failed (default: trials)",
    "space": "parameter distributions, as sweep.random.space",
    "architecture": "mlp layers: {layers: [min, max], width: [min, max], activation: [...], dropout: [low, high]}",
    "evolution": "{population, generations, tournament, mutation_rate, crossover_rate, elitism}",
    "asha": "{min_epochs, max_epochs, reduction_factor, metric}: stop poor trials early, from their reports",
}
SECTIONS = {"oof": "out-of-fold predictions", "ensemble_holdout": "the fold ensemble on the holdout",
            "reported": "the mean over folds of the trainer's last report"}
SCORES = ("accuracy", "log_loss", "macro_f1")
DIRECTIONS = ("maximize", "minimize")
ARCH_KEYS = ("layers", "width", "activation", "dropout")
ARCH_PARAMS = ("hidden", "activation", "dropout")  # what an architecture sets
EVOLUTION_KEYS = {"population": (2, 10000, 8), "generations": (1, 10000, 5), "tournament": (1, 100, 3),
                  "mutation_rate": (0.0, 1.0, 0.3), "crossover_rate": (0.0, 1.0, 0.5),
                  "elitism": (0, 10000, 1)}
ASHA_KEYS = ("min_epochs", "max_epochs", "reduction_factor", "metric")
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class Dist:
    """One searched parameter: {kind: args} as in sweep.random.space."""

    name: str
    kind: str  # uniform, loguniform, randint, choice
    args: tuple[Any, ...]  # (low, high) or the choices


@dataclass(frozen=True)
class Architecture:
    """A variable-depth MLP: `hidden` (one width per layer), `activation`, `dropout`."""

    layers: tuple[int, int]
    width: tuple[int, int]
    activations: tuple[str, ...]
    dropout: tuple[float, float] | None


@dataclass(frozen=True)
class Evolution:
    population: int = 8
    generations: int = 5
    tournament: int = 3
    mutation_rate: float = 0.3
    crossover_rate: float = 0.5
    elitism: int = 1

    @property
    def trials(self) -> int:
        """The first generation in full, then each one's children (its elites carry over)."""
        return self.population + (self.generations - 1) * (self.population - self.elitism)


@dataclass(frozen=True)
class Asha:
    """Early stopping from the reports a run sends while it trains (orchestrator.search.asha)."""

    min_epochs: int
    max_epochs: int
    reduction_factor: int
    metric: str = ""  # reported.<name>: what the trainer reports at every epoch, compared at the rungs
    direction: str = "maximize"

    @property
    def rungs(self) -> list[int]:
        """The epochs at which a trial is compared: min, min*eta, ... below max_epochs
        (a trial that passes the last one trains to max_epochs)."""
        out, e = [], self.min_epochs
        while e < self.max_epochs:
            out.append(e)
            e *= self.reduction_factor
        return out

    @property
    def name(self) -> str:
        """The key of the trainer's report compared at the rungs (`score` for reported.score)."""
        return self.metric.split(".", 1)[1]


@dataclass(frozen=True)
class SearchConfig:
    strategy: str
    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    trials: int
    parallel: int
    seed: int
    mode: str
    max_failed_trials: int
    space: tuple[Dist, ...]
    architecture: Architecture | None = None
    evolution: Evolution | None = None
    asha: Asha | None = None

    @property
    def names(self) -> list[str]:
        """The trainer params a proposal sets, in a fixed order."""
        arch = list(ARCH_PARAMS) if self.architecture else []
        if self.architecture and self.architecture.dropout is None:
            arch.remove("dropout")
        return [*arch, *(d.name for d in self.space)]

    def identity(self) -> dict[str, Any]:
        """What may not change between two submissions of one search (its trials would
        mean something else): all but the budget (trials, generations) and the pace."""
        data = self.to_dict()
        for key in ("trials", "parallel", "max_failed_trials"):
            data.pop(key)
        if data.get("evolution"):
            data["evolution"] = {k: v for k, v in data["evolution"].items() if k != "generations"}
        return data

    def to_dict(self) -> dict[str, Any]:
        arch = self.architecture
        return {
            "strategy": self.strategy, "metrics": list(self.metrics), "directions": list(self.directions),
            "trials": self.trials, "parallel": self.parallel, "seed": self.seed, "mode": self.mode,
            "max_failed_trials": self.max_failed_trials,
            "space": [[d.name, d.kind, list(d.args)] for d in self.space],
            "architecture": None if arch is None else {
                "layers": list(arch.layers), "width": list(arch.width),
                "activation": list(arch.activations),
                "dropout": None if arch.dropout is None else list(arch.dropout)},
            "evolution": None if self.evolution is None else vars(self.evolution).copy(),
            "asha": None if self.asha is None else vars(self.asha).copy(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        arch = d.get("architecture")
        return cls(
            strategy=d["strategy"], metrics=tuple(d["metrics"]), directions=tuple(d["directions"]),
            trials=int(d["trials"]), parallel=int(d["parallel"]), seed=int(d["seed"]), mode=d["mode"],
            max_failed_trials=int(d["max_failed_trials"]),
            space=tuple(Dist(n, k, tuple(a)) for n, k, a in d["space"]),
            architecture=None if not arch else Architecture(
                tuple(arch["layers"]), tuple(arch["width"]), tuple(arch["activation"]),  # type: ignore[arg-type]
                None if arch["dropout"] is None else tuple(arch["dropout"])),  # type: ignore[arg-type]
            evolution=None if not d.get("evolution") else Evolution(**d["evolution"]),
            asha=None if not d.get("asha") else Asha(**d["asha"]),
        )


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def metric_problem(metric: Any) -> str | None:
    """Why `metric` names no metric that finalize records, or None."""
    valid = (f"<section>.<name> with section {', '.join(SECTIONS)}; oof and ensemble_holdout have "
             f"{', '.join(SCORES)}; reported.<name> is a value the trainer reports (e.g. reported.score)")
    if not isinstance(metric, str) or metric.count(".") != 1:
        return f"must be a metric name, got {metric!r}; valid: {valid}"
    section, name = metric.split(".")
    if section not in SECTIONS:
        return f"unknown section {section!r}{did_you_mean(section, list(SECTIONS))}; valid: {valid}"
    if section != "reported" and name not in SCORES:
        return f"unknown metric {name!r}{did_you_mean(name, list(SCORES))}; valid: {valid}"
    if section == "reported" and not name.isidentifier():
        return f"reported.<name> needs a name like score, got {name!r}"
    return None


class _Check:
    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems

    def bad(self, key: str, message: str) -> None:
        self.problems.append((f"search.{key}" if key else "search", message))


def parse_search(block: Any, trainer_params: dict[str, Any] | None,
                 check_value: Any, fixed: dict[str, Any]) -> tuple[SearchConfig | None, list[tuple[str, str]]]:
    """(config or None, [(key path, message)]). `trainer_params`: the trainer's declared
    params (None if the trainer is unknown); `check_value(key, name, value)` checks one
    value against the trainer; `fixed`: the experiment's `params`."""
    problems: list[tuple[str, str]] = []
    c = _Check(problems)
    if not isinstance(block, dict) or not block:
        c.bad("", "must be a mapping with at least strategy, metric and space (or architecture)")
        return None, problems
    for key in block:
        if key not in SEARCH_KEYS:
            c.bad(str(key), f"unknown key{did_you_mean(str(key), list(SEARCH_KEYS))}; "
                            f"valid keys: {', '.join(SEARCH_KEYS)}")
    strategy = block.get("strategy")
    if strategy not in STRATEGIES:
        c.bad("strategy", f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
                          + (did_you_mean(str(strategy), list(STRATEGIES)) if isinstance(strategy, str) else ""))
    metrics, directions = _objectives(c, block, strategy)
    space = _space(c, block.get("space"), trainer_params, check_value, fixed)
    arch = _architecture(c, block.get("architecture"), trainer_params, fixed, space)
    if not space and arch is None and "space" not in block:
        c.bad("space", "required: what to search, e.g. {lr: {loguniform: [0.0001, 0.1]}} "
                       "(or an architecture block for the mlp trainer)")
    evolution = _evolution(c, block.get("evolution"), strategy)
    trials: Any = block.get("trials")
    if strategy == "evolution":
        if trials is not None:
            c.bad("trials", "not used by evolution: its trials are population + (generations - 1) x "
                            "(population - elitism); set evolution.population and evolution.generations")
        trials = (evolution or Evolution()).trials
    elif not _int(trials) or not 1 <= trials <= MAX_TRIALS:
        c.bad("trials", f"must be an integer from 1 to {MAX_TRIALS}, got {trials!r}")
        trials = 1
    parallel: Any = block.get("parallel", 4)
    if not _int(parallel) or not 1 <= parallel <= 10000:
        c.bad("parallel", f"must be an integer from 1 to 10000 (trials in flight), got {parallel!r}")
        parallel = 1
    seed: Any = block.get("seed", 0)
    if not _int(seed) or not 0 <= seed < 2**32:
        c.bad("seed", f"must be an integer from 0 to {2**32 - 1}, got {seed!r}")
        seed = 0
    # With ASHA, random and tpe fill a slot as soon as a trial is pruned (async) unless
    # `mode: batch` asks for determinism (orchestrator.search.asha: batch mode judges in
    # trial order).
    asha_async = isinstance(block.get("asha"), dict) and strategy in ASYNC_STRATEGIES
    mode = block.get("mode", "async" if asha_async else "batch")
    if mode not in MODES:
        c.bad("mode", f"must be batch or async, got {mode!r}")
    elif mode == "async" and strategy in STRATEGIES and strategy not in ASYNC_STRATEGIES:
        c.bad("mode", f"async is for {' and '.join(ASYNC_STRATEGIES)}; {strategy} is generational: use batch")
    max_failed: Any = block.get("max_failed_trials", trials)
    if not _int(max_failed) or max_failed < 0:
        c.bad("max_failed_trials", f"must be an integer >= 0, got {max_failed!r}")
        max_failed = trials
    asha = _asha(c, block.get("asha"), trainer_params, fixed, space, metrics, directions)
    if problems:
        return None, problems
    assert isinstance(strategy, str) and isinstance(mode, str)
    if strategy == "evolution" and evolution is None:
        evolution = Evolution()
    if evolution is not None and strategy == "evolution":
        parallel = min(parallel, evolution.population)
    config = SearchConfig(strategy=strategy, metrics=tuple(metrics), directions=tuple(directions),
                          trials=int(trials), parallel=int(parallel), seed=int(seed), mode=mode,
                          max_failed_trials=int(max_failed), space=tuple(space), architecture=arch,
                          evolution=evolution, asha=asha)
    return replace(config), problems


def _objectives(c: _Check, block: dict[str, Any], strategy: Any) -> tuple[list[str], list[str]]:
    metric = block.get("metric")
    if metric is None:
        c.bad("metric", "required: a metric finalize records, e.g. oof.accuracy or reported.score")
        return [], []
    metrics = metric if isinstance(metric, list) else [metric]
    many = strategy == "nsga2"
    if not many and len(metrics) != 1:
        c.bad("metric", f"{strategy} optimises one metric; several are for nsga2")
    if many and (not isinstance(metric, list) or len(metrics) < 2):
        c.bad("metric", "nsga2 needs a list of at least two metrics, e.g. [oof.accuracy, oof.log_loss]")
    for i, m in enumerate(metrics):
        if (problem := metric_problem(m)) is not None:
            c.bad("metric" if len(metrics) == 1 else f"metric[{i}]", problem)
    direction = block.get("direction")
    if direction is None:  # a loss is minimised, anything else maximised
        directions = ["minimize" if str(m).endswith("loss") else "maximize" for m in metrics]
    else:
        directions = direction if isinstance(direction, list) else [direction]
        if len(directions) != len(metrics):
            c.bad("direction", f"needs one direction per metric ({len(metrics)}), got {direction!r}")
        for d in directions:
            if d not in DIRECTIONS:
                c.bad("direction", f"must be maximize or minimize, got {d!r}")
                break
    return [str(m) for m in metrics], [str(d) for d in directions]


def _space(c: _Check, space: Any, trainer_params: dict[str, Any] | None, check_value: Any,
           fixed: dict[str, Any]) -> list[Dist]:
    if space is None:
        return []
    valid = ", ".join(f"{{{k}: {v}}}" for k, v in DISTRIBUTIONS.items())
    if not isinstance(space, dict) or not space:
        c.bad("space", f"must map parameter names to distributions: {valid}")
        return []
    dists: list[Dist] = []
    for name, dist in space.items():
        key = f"space.{name}"
        if trainer_params is not None and name not in trainer_params:
            c.bad(key, f"unknown parameter {name!r}{did_you_mean(str(name), list(trainer_params))}; "
                       f"valid: {', '.join(trainer_params)}")
            continue
        if name in fixed:
            c.bad(key, f"{name!r} is both fixed in 'params' and searched")
            continue
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            c.bad(key, f"must be one distribution: {valid}")
            continue
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                c.bad(key, "choice needs a non-empty list of values")
                continue
        elif not (isinstance(args, list) and len(args) == 2 and all(_num(a) for a in args) and args[0] < args[1]):
            c.bad(key, f"{kind} needs {DISTRIBUTIONS[kind]} with low < high, got {args!r}")
            continue
        elif kind == "loguniform" and args[0] <= 0:
            c.bad(key, f"loguniform needs low > 0, got {args!r}")
            continue
        elif kind == "randint" and not all(_int(a) for a in args):
            c.bad(key, f"randint needs integer bounds, got {args!r}")
            continue
        before = len(c.problems)
        for value in args:  # the bounds (or every choice) must be valid for the trainer
            check_value(f"search.{key}", str(name), value)
            if len(c.problems) > before:
                break
        if len(c.problems) == before:
            dists.append(Dist(str(name), kind, tuple(args)))
    return dists


def _pair(c: _Check, key: str, value: Any, integer: bool, low: float, high: float) -> tuple[Any, Any] | None:
    ok = isinstance(value, list) and len(value) == 2 and all(_int(v) if integer else _num(v) for v in value)
    if not ok or not low <= value[0] <= value[1] <= high:
        what = "integers" if integer else "numbers"
        c.bad(key, f"must be [min, max], {what} with {low:g} <= min <= max <= {high:g}, got {value!r}")
        return None
    return value[0], value[1]


def _architecture(c: _Check, arch: Any, trainer_params: dict[str, Any] | None, fixed: dict[str, Any],
                  space: list[Dist]) -> Architecture | None:
    if arch is None:
        return None
    if not isinstance(arch, dict):
        c.bad("architecture", "must be a mapping {layers: [1, 3], width: [16, 128], "
                              "activation: [relu, tanh], dropout: [0.0, 0.5]}")
        return None
    if trainer_params is not None and not all(p in trainer_params for p in ARCH_PARAMS):
        c.bad("architecture", "is for trainers with hidden, activation and dropout params (mlp)")
        return None
    for key in arch:
        if key not in ARCH_KEYS:
            c.bad(f"architecture.{key}", f"unknown key{did_you_mean(str(key), list(ARCH_KEYS))}; "
                                         f"valid: {', '.join(ARCH_KEYS)}")
    for name in ARCH_PARAMS:
        if name in fixed or any(d.name == name for d in space):
            c.bad("architecture", f"sets {name!r}, which is also in 'params' or search.space")
    layers = _pair(c, "architecture.layers", arch.get("layers"), True, 1, 16)
    width = _pair(c, "architecture.width", arch.get("width"), True, 1, 65536)
    acts = arch.get("activation", ["relu"])
    valid_acts = ("relu", "tanh", "gelu", "sigmoid", "leaky_relu")
    if not isinstance(acts, list) or not acts or not all(a in valid_acts for a in acts):
        c.bad("architecture.activation", f"must be a non-empty list of {', '.join(valid_acts)}, got {acts!r}")
        acts = None
    dropout = None
    if "dropout" in arch:
        dropout = _pair(c, "architecture.dropout", arch["dropout"], False, 0.0, 0.95)
        if dropout is None:
            return None
    if layers is None or width is None or acts is None:
        return None
    return Architecture(layers=layers, width=width, activations=tuple(acts), dropout=dropout)


def _evolution(c: _Check, evo: Any, strategy: Any) -> Evolution | None:
    if evo is None:
        return None
    if strategy != "evolution":
        c.bad("evolution", f"is for strategy: evolution, not {strategy!r}")
        return None
    if not isinstance(evo, dict):
        c.bad("evolution", f"must be a mapping with {', '.join(EVOLUTION_KEYS)}")
        return None
    values: dict[str, Any] = {}
    for key in evo:
        if key not in EVOLUTION_KEYS:
            c.bad(f"evolution.{key}", f"unknown key{did_you_mean(str(key), list(EVOLUTION_KEYS))}; "
                                      f"valid: {', '.join(EVOLUTION_KEYS)}")
    for key, (low, high, default) in EVOLUTION_KEYS.items():
        value = evo.get(key, default)
        integer = isinstance(default, int)
        if (not (_int(value) if integer else _num(value))) or not low <= value <= high:
            c.bad(f"evolution.{key}", f"must be {'an integer' if integer else 'a number'} from {low} to {high}, "
                                      f"got {value!r}")
            value = default
        values[key] = value
    if values["elitism"] >= values["population"]:
        c.bad("evolution.elitism", f"must be below population ({values['population']}), got {values['elitism']}")
        values["elitism"] = 0
    if values["tournament"] > values["population"]:
        c.bad("evolution.tournament", f"must be at most population ({values['population']}), "
                                      f"got {values['tournament']}")
    return Evolution(**values)


def _asha(c: _Check, asha: Any, trainer_params: dict[str, Any] | None, fixed: dict[str, Any],
          space: list[Dist], metrics: list[str], directions: list[str]) -> Asha | None:
    if asha is None:
        return None
    if not isinstance(asha, dict) or set(asha) - set(ASHA_KEYS):
        c.bad("asha", f"must be a mapping with {', '.join(ASHA_KEYS)}, e.g. "
                      "{min_epochs: 1, max_epochs: 27, reduction_factor: 3}")
        return None
    metric: Any = asha.get("metric")
    if metric is None:  # the search's own metric, when it is one the trainer reports
        metric = metrics[0] if metrics and str(metrics[0]).startswith("reported.") else None
        if metric is None:
            c.bad("asha.metric", "required when search.metric is not a reported value: ASHA compares "
                                 "what the trainer reports while it trains, e.g. reported.train_loss (mlp)")
            return None
    elif (problem := metric_problem(metric)) is not None or not str(metric).startswith("reported."):
        c.bad("asha.metric", problem or f"must be a value the trainer reports at every epoch, "
                                        f"reported.<name> (e.g. reported.train_loss), got {metric!r}")
        return None
    if metrics and metric == metrics[0] and directions:
        direction = directions[0]
    else:
        direction = "minimize" if str(metric).endswith("loss") else "maximize"
    if trainer_params is not None and "epochs" not in trainer_params:
        c.bad("asha", "needs a trainer with an `epochs` param (it sets each trial's epoch budget)")
        return None
    if "epochs" in fixed or any(d.name == "epochs" for d in space):
        c.bad("asha", "sets `epochs` itself (max_epochs): remove epochs from params and search.space")
    mn: Any = asha.get("min_epochs")
    mx: Any = asha.get("max_epochs")
    eta: Any = asha.get("reduction_factor")
    if not _int(mn) or mn < 1:
        c.bad("asha.min_epochs", f"must be an integer >= 1, got {mn!r}")
        return None
    if not _int(mx) or mx <= mn:
        c.bad("asha.max_epochs", f"must be an integer above min_epochs ({mn}), got {mx!r}")
        return None
    if not _int(eta) or eta < 2:
        c.bad("asha.reduction_factor", f"must be an integer >= 2, got {eta!r}")
        return None
    return Asha(min_epochs=mn, max_epochs=mx, reduction_factor=eta, metric=str(metric), direction=direction)
