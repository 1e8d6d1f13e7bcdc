"""ASHA from the reports a run sends while it trains (Li et al., arXiv 1810.05934).

Each trial trains one run per fold to `max_epochs`. Its runs report the ASHA metric at
every epoch; at each rung epoch (min_epochs, min_epochs x eta, ... below max_epochs) the
worker hands that report to the control side (orchestrator.search.rungs), and a search
step judges it here: once every run of the trial has reported the rung, the trial's
value there is their mean, recorded in the journal (`rung`), and the trial goes on only
if that value is in the top 1/eta of the values recorded at that rung so far, itself
included. With fewer than eta values, only the best so far goes on (Optuna's
SuccessiveHalvingPruner does the same). A trial that does not is recorded PRUNED, with
the rung and the value, and its runs are stopped (prune.stop).

Where it runs: in the search step (engine.step), under the search's lock, on the
records the step already reads, rather than in a task of its own: a decision needs the
journal and the lock anyway, and the step already records, proposes (a pruned trial's
slot is filled in the same write) and recovers after a kill. The worker that wrote a
rung report asks for a step (rungs.step_soon); the steps after every group and from the
watchdog every ORCH_WATCHDOG_INTERVAL judge it should that message be lost. No other
process or state is added. Each decision is a
function of the journal (the rung values in the order they were recorded) and is written
to it, with the rung value, before any run is stopped (write-ahead, as proposals are):
a step killed in between stops the runs at the next step; a decision is never taken
twice.

Determinism. In `mode: async` (random and tpe; their default with ASHA) a trial is
judged as soon as its runs reported a rung, against the values recorded there so far:
which trials are pruned depends on the order reports arrive in, so such a search is not
reproducible across runs or worker counts. In batch mode (evolution, cmaes, nsga2, and
random or tpe with `mode: batch`), trial k is judged at a rung once every earlier trial
still running has reported it (or ended), against the values of the earlier trials
only: a function of the trials' own reports (seeded training) and their numbers, so the
same seed prunes the same trials and proposes the same points with any number of
workers, in whatever order trials finish. The price: a trial may train a little past a
rung while it waits for an earlier one (docs/search.md).

How a pruned trial is told to the strategy: random and TPE (Optuna) get TrialState.PRUNED
with its last rung value as an intermediate value (TPE ranks pruned trials by it);
generational strategies (cmaes, evolution) get its last rung value as its result, when
the ASHA metric is the search's metric, else it counts as failed; nsga2 (several
metrics, one of them at the rungs) counts it as failed. See `told`.
"""

from __future__ import annotations

from typing import Any

from .config import SearchConfig
from .journal import COMPLETE, PRUNED, RUNNING, History, Trial, apply

Reports = dict[tuple[str, int], dict[str, float]]
GENERATIONAL = ("cmaes", "nsga2", "evolution")


def goes_on(value: float, at_rung: list[float], eta: int, maximize: bool) -> bool:
    """ASHA's rule: `value` (one of `at_rung`, the values recorded at the rung so far)
    is in their top 1/eta; with fewer than eta values, the best of them."""
    ranked = sorted(at_rung, reverse=maximize)
    k = max(1, len(ranked) // eta)
    cut = ranked[k - 1]
    return value >= cut if maximize else value <= cut


def judge(cfg: SearchConfig, h: History, run_ids: dict[int, list[str]], reports: Reports,
          ended: set[int] | frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """The journal entries of what the rung reports decide, applied to `h` as they are
    made: a `rung` entry per trial and rung whose runs have all reported it (in trial
    number, then rung order), and a PRUNED result for a trial that does not go on.
    `run_ids`: each running trial's runs (every fold of every group); `ended`: trials
    whose runs have all ended (their rung values count for the others; nothing is left
    of them to prune)."""
    asha = cfg.asha
    assert asha is not None
    maximize = asha.direction == "maximize"
    ordered = cfg.mode == "batch"
    running = sorted(n for n, t in h.trials.items() if t.state == RUNNING)
    out: list[dict[str, Any]] = []
    for number in sorted(run_ids):
        t = h.trials[number]
        for epoch in asha.rungs:
            if t.state != RUNNING:
                break
            if epoch in t.rungs:
                continue
            found = [reports.get((rid, epoch), {}).get(asha.name) for rid in run_ids[number]]
            if not found or any(v is None for v in found):
                break  # not every run has reported this rung (yet)
            if ordered and number not in ended and any(
                    h.trials[j].state == RUNNING and epoch not in h.trials[j].rungs and j not in ended
                    for j in running if j < number):
                break  # batch mode: judged once every earlier trial still running has reached the rung
            value = sum(v for v in found if v is not None) / len(found)
            entry: dict[str, Any] = {"type": "rung", "number": number, "epoch": epoch, "value": value}
            # Compared with the values recorded at the rung so far; in batch mode, with
            # those of the earlier trials only (the same whatever order reports come in).
            values = [u.rungs[epoch] for u in h.trials.values()
                      if epoch in u.rungs and (not ordered or u.number < number)] + [value]
            out.append(entry)
            apply(h, entry)
            if number not in ended and not goes_on(value, values, asha.reduction_factor, maximize):
                result = {"type": "result", "number": number, "state": PRUNED, "rung": epoch,
                          "error": f"pruned by ASHA at epoch {epoch}: {asha.metric} {value:.6g} is not in the "
                                   f"top 1/{asha.reduction_factor} of the {len(values)} values at that rung"}
                out.append(result)
                apply(h, result)
    return out


def last_rung_value(t: Trial) -> float | None:
    return t.rungs[max(t.rungs)] if t.rungs else None


def told(cfg: SearchConfig, t: Trial) -> tuple[str, list[float] | None]:
    """What the strategy is told of a trial: (COMPLETE, values), (PRUNED, [its last rung
    value] or None), (FAILED, None) or (RUNNING, None). See the module docstring."""
    if t.state == COMPLETE and t.values:
        return COMPLETE, t.values
    if t.state == PRUNED:
        asha = cfg.asha
        value = last_rung_value(t)
        same = asha is not None and len(cfg.metrics) == 1 and asha.metric == cfg.metrics[0]
        if cfg.strategy in GENERATIONAL:
            return (COMPLETE, [value]) if same and value is not None else ("FAILED", None)
        return PRUNED, [value] if same and value is not None else None
    if t.state == RUNNING:
        return RUNNING, None
    return "FAILED", None
