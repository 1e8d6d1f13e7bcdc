"""Proposals from Optuna's samplers (random, TPE, CMA-ES, NSGA-II) through ask/tell.

Optuna is imported here only, by the control side's search steps (and `plan`).

Why the study is rebuilt from our own journal at every ask instead of kept in Optuna's
storage: the journal is already the durable record the step writes before it publishes
(write-ahead), and it lives under the results root with the rest of the experiment; a
second store (Optuna's JournalRedisBackend: 4 EVALs per trial, ~9-40 ms a trial here)
could disagree with it after a kill between the two writes, and Redis may lose its data.
An in-memory study filled with `add_trial` from the journal costs well under a
millisecond per trial. Determinism: each batch gets a fresh sampler seeded from the
search's seed and the number of its first trial, and the study holds exactly the
journal's trials (their values, states and Optuna's own system attributes, e.g. CMA-ES's
optimizer state) in trial-number order, so the same journal always yields the same
proposals, whichever process asks, and again after a kill before they were recorded.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from .config import SearchConfig
from .journal import COMPLETE, FAILED, PRUNED, Trial
from .space import optuna_distributions, rounded_raw


def derived_seed(seed: int, number: int) -> int:
    return int(hashlib.sha256(f"{seed}:{number}".encode()).hexdigest()[:8], 16)


def _sampler(cfg: SearchConfig, seed: int) -> Any:
    import optuna

    if cfg.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.strategy == "tpe":
        # constant_liar: trials still running count as (pessimistic) results, so a batch
        # of asks spreads out instead of proposing one point `parallel` times.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=10)
    if cfg.strategy == "cmaes":  # one CMA-ES generation per batch of `parallel`
        return optuna.samplers.CmaEsSampler(seed=seed, popsize=max(2, cfg.parallel),
                                            warn_independent_sampling=False)
    if cfg.strategy == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, cfg.parallel))
    raise ValueError(f"no Optuna sampler for strategy {cfg.strategy!r}")


def ask(cfg: SearchConfig, trials: list[Trial], n: int, first: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`n` proposals after `trials` (in number order): [(raw values, system attrs)]."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = optuna_distributions(cfg)
    directions: list[Any] = list(cfg.directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature and independent-sampling notes
        study = optuna.create_study(directions=directions, sampler=_sampler(cfg, derived_seed(cfg.seed, first)))
        for t in trials:
            state = {COMPLETE: TrialState.COMPLETE, FAILED: TrialState.FAIL,
                     PRUNED: TrialState.PRUNED}.get(t.state, TrialState.RUNNING)
            if t.state in (COMPLETE, PRUNED) and t.values:  # ASHA: told its value at its last rung
                state = TrialState.COMPLETE
            values = t.values if state == TrialState.COMPLETE else None
            study.add_trial(create_trial(state=state, values=values, params=t.raw,
                                         distributions=dists, system_attrs=t.system_attrs))
        out = []
        for _ in range(n):
            trial = study.ask(dists)
            raw = rounded_raw(cfg, trial.params)
            attrs = study.get_trials(deepcopy=False)[-1].system_attrs
            out.append((raw, dict(attrs)))
    return out
