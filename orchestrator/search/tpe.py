"""Optuna's TPESampler with its per-ask work over every trial kept per study.

At 1,000 trials an ask of Optuna's TPE spent most of its time in Python loops over all
the trials that give the same answer for a trial at every ask: converting its params to
the floats the Parzen estimators are built from (`_get_internal_repr`), and asking each
finished trial whether it is infeasible (`_split_trials`, which reads its constraints
out of its system attributes). Both depend on what a trial holds once it is asked (its
params) or once it has ended (its constraints), which never change after, so they are
kept per study, by trial number, in `Memo` (made with the study: samplers.py). The
arrays and the split are exactly Optuna's, so the proposals are too
(tests/test_search_unit.py compares this sampler with Optuna's own, trial by trial).

This module imports Optuna: the control side's search steps only (samplers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.samplers import TPESampler
from optuna.samplers._tpe import sampler as optuna_tpe
from optuna.trial import FrozenTrial, TrialState


@dataclass
class Memo:
    """What CachedTPE keeps of one study's trials, by trial number."""

    # search space names -> trial number -> its params' internal representations
    reprs: dict[tuple[str, ...], dict[int, tuple[Any, ...]]] = field(default_factory=dict)
    infeasible: dict[int, float] = field(default_factory=dict)  # a finished trial's score


class CachedTPE(TPESampler):  # type: ignore[misc]  # Optuna is untyped here
    """TPESampler whose per-trial work is kept in `memo` (one per study)."""

    memo: Memo = Memo()  # replaced by ask() with the study's own

    def _get_internal_repr(self, trials: list[FrozenTrial], search_space: dict[str, Any],
                           study: Any) -> dict[str, np.ndarray]:
        """TPESampler._get_internal_repr, a trial's row converted once."""
        names = tuple(search_space)
        known = self.memo.reprs.setdefault(names, {})
        rows = []
        for trial in trials:
            row = known.get(trial.number)
            if row is None:
                params = self._get_params(trial, study)
                if not search_space.keys() <= params.keys():
                    continue  # as Optuna: a trial without every param is left out (not kept)
                row = known[trial.number] = tuple(d.to_internal_repr(params[n]) for n, d in search_space.items())
            rows.append(row)
        return {name: np.asarray([row[i] for row in rows]) for i, name in enumerate(names)}

    def _sample(self, study: Any, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        """TPESampler._sample (Optuna 5.1) with `_split` for its `_split_trials`."""
        states = [TrialState.COMPLETE, TrialState.PRUNED]
        if self._constant_liar:
            states.append(TrialState.RUNNING)
        trials = study._get_trials(deepcopy=False, states=states, use_cache=not self._constant_liar)
        if self._constant_liar:  # the current trial left out
            trials = [t for t in trials if trial.number != t.number]
        if self._gamma is None:
            self._gamma = (optuna_tpe.default_gamma if len(study.directions) <= 1
                           else optuna_tpe.default_gamma_multiobjective)
        n = sum(t.state != TrialState.RUNNING for t in trials)  # running trials ignored (optuna#4073)
        below_trials, above_trials = self._split(study, trials, self._gamma(n))
        mpe_below = self._build_parzen_estimator(study, search_space, below_trials, handle_below=True)
        mpe_above = self._build_parzen_estimator(study, search_space, above_trials, handle_below=False)
        samples_below = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        acq_func_vals = self._compute_acquisition_func(samples_below, mpe_below, mpe_above)
        ret = TPESampler._compare(samples_below, acq_func_vals)
        for param_name, dist in search_space.items():
            ret[param_name] = dist.to_external_repr(ret[param_name])
        return ret

    def _split(self, study: Any, trials: list[FrozenTrial],
               n_below: int) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """optuna_tpe._split_trials, a finished trial's infeasibility computed once."""
        complete, pruned, running, infeasible = [], [], [], []
        scores = self.memo.infeasible
        for t in trials:
            if t.state == TrialState.RUNNING:  # before the feasibility check, as Optuna
                running.append(t)
                continue
            score = scores.get(t.number)
            if score is None:
                score = scores[t.number] = optuna_tpe._get_infeasible_trial_score(t)
            if score > 0:
                infeasible.append(t)
            elif t.state == TrialState.COMPLETE:
                complete.append(t)
            elif t.state == TrialState.PRUNED:
                pruned.append(t)
            else:
                raise AssertionError(f"trial {t.number} in state {t.state} among TPE's trials")
        below_complete, above_complete = optuna_tpe._split_complete_trials(complete, study, n_below)
        n_below = max(0, n_below - len(below_complete))
        below_pruned, above_pruned = optuna_tpe._split_pruned_trials(pruned, study, n_below)
        n_below = max(0, n_below - len(below_pruned))
        below_infeasible, above_infeasible = optuna_tpe._split_infeasible_trials(infeasible, n_below)
        below = below_complete + below_pruned + below_infeasible
        above = above_complete + above_pruned + above_infeasible + running
        below.sort(key=lambda t: t.number)
        above.sort(key=lambda t: t.number)
        return below, above
