"""The search loop as idempotent steps on the control side: no driver process to lose.

A step (`step`), under the search's lock: read the journal; record the result of every
trial whose groups have all ended (finalizing a group whose chord callback was lost);
ask the strategy for enough proposals to fill the free slots and record them (write-
ahead) before publishing their groups; rewrite the manifest. Steps run after each
trial group's finalize (tasks.search_step) and from the watchdog, and a submission
runs one; any number of them, at any moment, in any process, decide the same things,
because each decision is a function of the journal, the group records and the seed.

A trial is a parameter point: its groups are (dataset x seed) of the experiment, each
its folds, trained and finalized as any group. Its score is the trial's metric (of the
group records) averaged over its groups. A proposal equal to a point already DONE reuses
it (same run_ids: nothing is trained); equal to a point that FAILED, it fails likewise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import settings
from ..collect.status import Status, fold_state, group_record_done, read_group_status
from ..dispatch.manifest import write_manifest_of
from ..errors import ConfigError, Problem
from ..experiment.config import Experiment
from ..experiment.expand import groups
from ..experiment.plan import SKIP, GroupPlan, make_plan
from ..experiment.spec import DatasetRef, RunSpec
from ..paths import Layout, atomic_write_json, file_lock, read_json
from . import asha, evolution, prune, rungs
from .config import SearchConfig
from .journal import (
    COMPLETE,
    FAILED,
    PRUNED,
    RUNNING,
    History,
    Trial,
    append,
    apply,
    forget_history,
    history,
    load_history,
    read_entries,
)
from .space import name_of, trainer_params

# A group whose folds have all ended this many lease periods ago (ORCH_LEASE_SECONDS)
# but whose chord callback has not recorded it (the control worker died holding it) is
# finalized by the step itself. A callback normally comes within a second of its last
# fold; a dead worker's unacknowledged one would wait for the visibility timeout.
ADOPT_AFTER_LEASES = 2.0
Publish = Callable[[str, list[GroupPlan]], None]


@dataclass(frozen=True)
class Search:
    """A submitted search: its config and how to make a trial's runs (search.json)."""

    experiment: str
    config_file: str
    trainer: str
    cfg: SearchConfig
    template: RunSpec  # the experiment's fixed params, first dataset and seed, fold 0
    datasets: tuple[DatasetRef, ...]
    outputs: tuple[str, ...]  # the output folder of each dataset
    seeds: tuple[int, ...]

    def specs(self, trial: Trial) -> list[RunSpec]:
        params = {**self.template.params, **trial.params}
        report_at: tuple[int, ...] = ()
        if self.cfg.asha is not None:  # one run to max_epochs, its reports at the rungs judged
            params["epochs"] = self.cfg.asha.max_epochs
            report_at = tuple(self.cfg.asha.rungs)
        out = []
        for ds, output in zip(self.datasets, self.outputs, strict=True):
            for seed in self.seeds:
                for fold in range(self.template.n_folds):
                    out.append(dataclasses.replace(self.template, dataset=ds, output=output, seed=seed,
                                                   fold=fold, params=params, point=trial.point,
                                                   report_at=report_at))
        return out


def search_of(exp: Experiment) -> Search:
    assert exp.search is not None
    first = RunSpec(experiment=exp.name, trainer=exp.trainer.name, trainer_version=exp.trainer.version,
                    dataset=exp.datasets[0], params={}, point="base", seed=exp.seeds[0], fold=0, k=exp.k,
                    validation=exp.validation, holdout=exp.holdout, output=exp.output_for(exp.datasets[0].name),
                    overrides=exp.overrides, resources=exp.resources, retries=exp.retries,
                    timeout=exp.timeout, priority=exp.priority)
    fixed = dict(exp.points[0][1]) if exp.points else {}
    return Search(exp.name, exp.file, exp.trainer.name, exp.search, dataclasses.replace(first, params=fixed),
                  exp.datasets, tuple(exp.output_for(d.name) for d in exp.datasets), exp.seeds)


def save_search(layout: Layout, search: Search) -> None:
    """search.json for the control side; refused (exit 2) if a search with other trials
    in its journal had another config: extending (more trials or generations) is fine."""
    path = layout.search_config(search.experiment)
    old = read_json(path)
    if isinstance(old, dict) and read_entries(layout.search_journal(search.experiment)):
        before = SearchConfig.from_dict(old["search"]).identity()
        if before != search.cfg.identity() or old.get("template") != search.template.to_dict():
            raise ConfigError([Problem(search.config_file, "search", (
                f"differs from the search already recorded under {layout.search_dir(search.experiment)} "
                "(only trials, parallel, max_failed_trials and evolution.generations may change); "
                "give the experiment a new name to start another search"))])
    data = {"experiment": search.experiment, "config": search.config_file, "trainer": search.trainer,
            "search": search.cfg.to_dict(), "template": search.template.to_dict(),
            "datasets": [dataclasses.asdict(d) for d in search.datasets], "outputs": list(search.outputs),
            "seeds": list(search.seeds)}
    if old != data:
        atomic_write_json(path, data)


def load_search(layout: Layout, experiment: str) -> Search | None:
    data = read_json(layout.search_config(experiment))
    if not isinstance(data, dict):
        return None
    return Search(data["experiment"], data["config"], data["trainer"], SearchConfig.from_dict(data["search"]),
                  RunSpec.from_dict(data["template"]), tuple(DatasetRef(**d) for d in data["datasets"]),
                  tuple(data["outputs"]), tuple(data["seeds"]))


def read_history(layout: Layout, experiment: str) -> History:
    """The search's trials (a fresh copy: callers may keep it)."""
    return history(read_entries(layout.search_journal(experiment)))


# -- what the records say -------------------------------------------------------
def metric_value(record: dict[str, Any], metric: str) -> float | None:
    section, name = metric.split(".")
    value = (record.get("metrics") or {}).get(section, {}).get(name)
    return float(value) if isinstance(value, int | float) else None


def _trial_outcome(layout: Layout, search: Search, trial: Trial, live: Any) -> dict[str, Any] | None:
    """The trial's result entry once every group has ended, else None."""
    values: list[list[float]] = []
    for specs in groups(search.specs(trial)):
        first = specs[0]
        record = read_group_status(layout, first) or {}
        status = record.get("train_status")
        if status not in (Status.DONE.value, Status.FAILED.value) and _adopt(layout, specs, live):
            record = read_group_status(layout, first) or {}  # finalized (or failed) just now
            status = record.get("train_status")
        if status == Status.DONE.value and group_record_done(layout, first, record, sorted(s.run_id for s in specs)):
            found = [metric_value(record, m) for m in search.cfg.metrics]
            if any(v is None for v in found):
                missing = [m for m, v in zip(search.cfg.metrics, found, strict=True) if v is None]
                return _failed(trial, f"{first.group_name}: no {', '.join(missing)} in its status.json")
            values.append([v for v in found if v is not None])
            continue
        if status == Status.FAILED.value:
            failed = record.get("failed") or {}
            return _failed(trial, f"{first.group_name}: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return None  # still running
    means = [sum(v[i] for v in values) / len(values) for i in range(len(search.cfg.metrics))]
    out = {"type": "result", "number": trial.number, "state": COMPLETE, "values": means}
    if search.cfg.asha is not None:
        out["budget"] = search.cfg.asha.max_epochs
    return out


def _failed(trial: Trial, error: str) -> dict[str, Any]:
    return {"type": "result", "number": trial.number, "state": FAILED, "error": error[:2000]}


def _adopt(layout: Layout, specs: list[RunSpec], live: Any) -> bool:
    """A group whose folds have all ended long enough ago, with no group record (its
    chord callback was lost with a control worker): finalize it (or record it FAILED)
    here. True if it did."""
    states = [fold_state(layout, s) for s in specs]
    ended = {Status.DONE.value, Status.FAILED.value}
    if not all(state in ended for state, _ in states):
        return False
    last = max(float(r.get("finished_at") or 0) for _, r in states)
    if time.time() - last < ADOPT_AFTER_LEASES * float(settings.value("ORCH_LEASE_SECONDS")):
        return False
    # Imported here: finalizing needs numpy and Redis's client, which a step that adopts
    # nothing (a cold process resuming a search, `submit`) need not import (~0.3 s).
    from ..collect.finalize import finalize_group, mark_group_failed
    from ..outage import is_outage

    if all(state == Status.DONE.value for state, _ in states):
        try:
            finalize_group(layout, specs, live)
        except Exception as exc:
            if is_outage(exc):  # Redis restarting: not the group's failure (the next step adopts it)
                raise
            mark_group_failed(layout, specs, reason=f"{type(exc).__name__}: {exc}", live=live)
    else:
        mark_group_failed(layout, specs, live=live, states=states)
    return True


# -- progress ---------------------------------------------------------------------
def progress(search: Search, h: History) -> dict[str, Any]:
    """Counts, the best trial so far and whether the search has ended."""
    cfg = search.cfg
    running = h.count(RUNNING)
    in_flight = sum(1 for t in h.trials.values() if t.state == RUNNING and t.published)
    failed = h.count(FAILED)
    stopped = failed > cfg.max_failed_trials
    asked = len(h.trials)
    best = best_trials(search, h, 1)
    generation = max((t.generation for t in h.trials.values()), default=0)
    return {"trials": cfg.trials, "proposed": asked, "complete": h.count(COMPLETE), "failed": failed,
            "pruned": h.count(PRUNED), "running": in_flight, "queued": running - in_flight,
            "generation": generation,
            "best": best[0] if best else None,
            "stopped": f"more than max_failed_trials={cfg.max_failed_trials} trials failed" if stopped else None,
            "finished": running == 0 and (stopped or asked >= cfg.trials)}


def best_trials(search: Search, h: History, top: int) -> list[Trial]:
    """The best COMPLETE trials by the first metric (ties: the earlier trial); with
    ASHA, a PRUNED trial is not COMPLETE: those listed trained to max_epochs."""
    sign = -1.0 if search.cfg.directions[0] == "maximize" else 1.0
    done = [t for t in h.trials.values() if t.state == COMPLETE and t.values]
    return sorted(done, key=lambda t: (sign * (t.values or [0.0])[0], t.number))[:top]


# -- proposals ----------------------------------------------------------------------
def _trial_entry(search: Search, number: int, generation: int, raw: dict[str, Any],
                 attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    params = trainer_params(search.cfg, raw)
    return {"type": "trial", "number": number, "generation": generation, "params": params, "raw": raw,
            "point": name_of(params), "system_attrs": attrs or {}, "t": time.time()}


def propose(search: Search, h: History) -> list[dict[str, Any]]:
    """The journal entries of the next proposals, or [] (nothing to ask now)."""
    cfg = search.cfg
    running = h.count(RUNNING)
    if h.count(FAILED) > cfg.max_failed_trials:
        return []
    left = cfg.trials - len(h.trials)
    first = len(h.trials)
    if left <= 0:
        return []
    if cfg.strategy == "evolution":
        assert cfg.evolution is not None
        if running:
            return []  # a generation waits for all its members (each ends: DONE or FAILED)
        if not h.trials:
            raws = evolution.first_generation(cfg, cfg.evolution)
            return [_trial_entry(search, first + i, 0, r) for i, r in enumerate(raws)]
        g = max(t.generation for t in h.trials.values())
        members = [h.trials[n] for n in h.elites.get(g, [])] + [t for t in h.ordered if t.generation == g]
        elites, raws = evolution.next_generation(cfg, cfg.evolution, g + 1, members)
        raws = raws[:left]
        return [{"type": "generation", "generation": g + 1, "elites": elites},
                *(_trial_entry(search, first + i, g + 1, r) for i, r in enumerate(raws))]
    if cfg.mode == "batch":
        if running:
            return []  # batches are generations: deterministic whatever finishes first
        n = min(cfg.parallel, left)
    else:
        n = min(cfg.parallel - running, left)
    if n <= 0:
        return []
    from .samplers import ask  # Optuna: imported by the control side only, when asking

    batch = first // max(1, cfg.parallel) if cfg.mode == "batch" else first
    return [_trial_entry(search, first + i, batch, raw, attrs)
            for i, (raw, attrs) in enumerate(ask(cfg, h.ordered, n, first, search.experiment))]


def _stop_pruned(layout: Layout, search: Search, h: History, live: Any, journal: Any) -> None:
    """Stop the runs of every PRUNED trial not stopped yet (after its PRUNED result is
    durable), then record that they were (not fsynced: lost, it means stopping again)."""
    todo = [t for t in h.ordered if t.state == PRUNED and not t.stopped]
    if not todo or live is None:
        return
    for t in todo:
        prune.stop(layout, live, search.specs(t), (t.error or "pruned by ASHA")[:500])
    append(journal, [{"type": "stopped", "numbers": [t.number for t in todo], "t": time.time()}], durable=False)


# -- the step -----------------------------------------------------------------------
def trial_plans(layout: Layout, search: Search, trials: list[Trial],
                skip: set[str] | None = None) -> list[GroupPlan]:
    """What publishing these trials means: per group, what is not DONE yet (a group
    already DONE, or one with a FAILED fold, is not trained again; nor one in `skip`: in
    flight for another trial with the same point)."""
    out: list[GroupPlan] = []
    seen: set[str] = set(skip or ())
    for trial in trials:
        for p in make_plan(layout, search.specs(trial)):
            if p.action == SKIP or p.first.group_id in seen:
                continue
            seen.add(p.first.group_id)
            record = read_group_status(layout, p.first) or {}
            if record.get("train_status") == Status.FAILED.value:
                continue
            # A fold that FAILED has ended: its group's error callback records the group
            # (or a step adopts it); publishing it again would train a failure twice.
            if not p.fresh and any(fold_state(layout, s)[0] == Status.FAILED.value for s in p.specs):
                continue
            out.append(p)
    return out


def all_plans(search: Search, h: History) -> list[GroupPlan]:
    """Every trial's groups, for the manifest (status, report, redispatch read it)."""
    out, seen = [], set()
    for trial in h.ordered:
        for specs in groups(search.specs(trial)):
            if specs[0].group_id not in seen:
                seen.add(specs[0].group_id)
                out.append(GroupPlan(specs=tuple(specs), todo=(), action=SKIP))
    return out


def step(layout: Layout, experiment: str, publish: Publish, live: Any = None,
         republish: bool | float = False) -> dict[str, Any]:
    """One idempotent step of the search (see the module docstring); returns its
    progress. `republish`: publish again every trial in flight (a submission: the
    broker may have lost their messages; a run delivered twice still trains once);
    a time: those published before it (a submission's own time: what a step published
    since is in the broker, and a second delivery of it would hold a worker waiting)."""
    before = (float("inf") if republish is True else float(republish)) if republish else None
    search = load_search(layout, experiment)
    if search is None:
        return {}
    journal = layout.search_journal(experiment)
    with file_lock(layout.search_lock(experiment)):
        changed = bool(republish)
        for _ in range(100_000):  # until a pass changes nothing (reused points end at once)
            h = load_history(journal)
            live_trials = [t for t in h.ordered if t.state == RUNNING and t.published]
            outcomes = {t.number: r for t in live_trials
                        if (r := _trial_outcome(layout, search, t, live)) is not None}
            # ASHA: the rung reports of the search's runs, read after the outcomes: a run
            # found ended has sent all its reports (later ones wait for the next step).
            reports = rungs.read(live, experiment) if search.cfg.asha is not None and live is not None else {}
            try:
                judged = (asha.judge(search.cfg, h, {t.number: [s.run_id for s in search.specs(t)]
                                                     for t in live_trials}, reports, set(outcomes))
                          if reports else [])
                results = [r for n, r in outcomes.items() if h.trials[n].state == RUNNING]
                for r in results:  # told to the strategy before it is asked (written below)
                    apply(h, r)
                new = propose(search, h)
                # One durable write: the rung values and what they decided, the results,
                # and the proposals before anything of them is published (write-ahead).
                append(journal, judged + results + new)
            except BaseException:
                forget_history(journal)  # it holds results that may not be written
                raise
            if any(e["type"] == "result" for e in judged):
                changed = True
                _stop_pruned(layout, search, load_history(journal), live, journal)
            h = load_history(journal)
            running = [t for t in h.ordered if t.state == RUNNING]
            inflight = sum(1 for t in running if t.published)
            fresh = [t for t in running if not t.published][:max(search.cfg.parallel - inflight, 0)]
            todo = ([t for t in running if t.published and t.published_at < before]
                    if before is not None else []) + fresh
            before = None
            if todo:
                numbers = {t.number for t in todo}
                busy = {s.group_id for t in running if t.published and t.number not in numbers
                        for s in search.specs(t)}
                plans = trial_plans(layout, search, todo, busy)
                if plans:
                    publish(experiment, plans)
                # Not fsynced: lost with a crashed host, it only means publishing again
                # (a run delivered twice trains once).
                append(journal, [{"type": "published", "numbers": [t.number for t in todo], "t": time.time()}],
                       durable=False)
            if results or new or todo:
                changed = True
                continue
            if live is not None:  # pruned trials a killed step did not stop (idempotent)
                _stop_pruned(layout, search, load_history(journal), live, journal)
            break
        h = load_history(journal)
        state = progress(search, h)
        if changed:
            write_manifest_of(layout, experiment, search.config_file, search.trainer, all_plans(search, h),
                              extra={"search": {k: v for k, v in state.items() if k != "best"}})
    return state
