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
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from .asha import told
from .config import SearchConfig
from .journal import COMPLETE, PRUNED, RUNNING, Trial
from .space import optuna_distributions


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


@dataclass
class _Cached:
    study: Any
    states: list[Any]  # what the study holds of each trial, by number: its TrialState
    running: set[int] = field(default_factory=set)  # the numbers it holds as RUNNING
    # TPE's IntersectionSearchSpace: incremental over the study's trials, so kept with the
    # study rather than rebuilt from all of them by each batch's fresh sampler (~1/5 of
    # an ask at 1,000 trials). A pure function of the trials: a cold process computes
    # the same search space, and so the same proposals.
    search_space: Any = None


# One in-memory study per search and process, brought up to date from the journal at
# each ask: adding 1,000 trials again at every batch cost ~1 ms each (O(trials^2) in
# all). It holds exactly what a study rebuilt from the journal would (the same params,
# values, states and system attributes, in trial-number order), so the proposals are
# the same whether a process has asked before or starts cold (tests check both).
_studies: dict[str, _Cached] = {}


def forget() -> None:
    """Drop this process's cached studies (the next ask rebuilds from the journal)."""
    _studies.clear()


def _told(cfg: SearchConfig, t: Trial) -> tuple[Any, list[float] | None]:
    """(Optuna's TrialState, values) of what the study is told of `t` (asha.told: a
    PRUNED trial's values are its last rung value, also its one intermediate value)."""
    from optuna.trial import TrialState

    state, values = told(cfg, t)
    return {COMPLETE: TrialState.COMPLETE, PRUNED: TrialState.PRUNED,
            RUNNING: TrialState.RUNNING}.get(state, TrialState.FAIL), values


def _study(cfg: SearchConfig, trials: list[Trial], key: str, dists: dict[str, Any]) -> Any:
    import optuna
    from optuna.trial import TrialState, create_trial

    cached = _studies.get(key)
    if cached is None or len(cached.states) > len(trials):  # a shorter journal: another search
        directions: list[Any] = list(cfg.directions)
        study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler())
        cached = _studies[key] = _Cached(study, [])
    study = cached.study
    for number in sorted(cached.running):  # those that ended since: told to the study
        t = trials[number]
        state, values = _told(cfg, t)
        if state != TrialState.RUNNING:
            if state == TrialState.COMPLETE:
                study.tell(number, values)
            else:
                if state == TrialState.PRUNED and values:  # its last rung value, as Optuna's own pruning
                    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
                    study._storage.set_trial_intermediate_value(trial_id, max(t.rungs), values[0])
                study.tell(number, state=state)
            cached.states[number] = state
            cached.running.discard(number)
    for t in trials[len(cached.states):]:  # recorded by another process
        state, values = _told(cfg, t)
        inter = {max(t.rungs): values[0]} if state == TrialState.PRUNED and values else None
        study.add_trial(create_trial(state=state, values=values if state != TrialState.RUNNING else None,
                                     params=t.raw, distributions=dists, system_attrs=t.system_attrs,
                                     intermediate_values=inter))
        cached.states.append(state)
        if state == TrialState.RUNNING:
            cached.running.add(t.number)
    return study


def ask(cfg: SearchConfig, trials: list[Trial], n: int, first: int,
        key: str = "") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`n` proposals after `trials` (in number order): [(raw values, system attrs)].
    `key`: names the search (its cached study)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = optuna_distributions(cfg)
    key = f"{key}:{json.dumps(cfg.identity(), sort_keys=True)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature and independent-sampling notes
        study = _study(cfg, trials, key, dists)
        study.sampler = _sampler(cfg, derived_seed(cfg.seed, first))
        cached = _studies[key]
        if hasattr(study.sampler, "_search_space"):  # TPE (a private attribute: only a cache)
            if cached.search_space is None:
                cached.search_space = study.sampler._search_space
            study.sampler._search_space = cached.search_space
        out = []
        for _ in range(n):
            trial = study.ask(dists)
            # Optuna's own values are recorded and told back (the trainer gets them cut
            # to 4 digits: space.trainer_params), so a study rebuilt from the journal
            # holds exactly the values this one does.
            attrs = study.get_trials(deepcopy=False)[-1].system_attrs
            out.append((dict(trial.params), dict(attrs)))
            cached = _studies[key]
            cached.running.add(len(cached.states))
            cached.states.append(TrialState.RUNNING)
    return out
