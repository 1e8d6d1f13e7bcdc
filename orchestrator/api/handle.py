"""`Experiment`: a handle on one experiment under a results root, as `Client.submit` and
`Client.experiments` return it. Everything it reads comes from the results root (the
record); waiting also polls the cluster's Redis (the live state)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..collect.status import Status
from ..paths import Layout

if TYPE_CHECKING:
    from .session import Session

FINAL = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)
FILE_CHECK_SECONDS = 5.0  # while waiting, the status files are read this often
# A metric where less is better; every other is more-is-better.
LOWER_IS_BETTER = ("log_loss",)


def cell_value(text: str) -> Any:
    """A final_results.csv cell as a Python value: '' -> None, numbers, True/False, and
    lists as `cell_text` writes them ('[64, 32]')."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text.startswith("["):
        with contextlib.suppress(ValueError):
            return json.loads(text)
        return text
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        return number if not isinstance(number, float) or math.isfinite(number) else text
    return text


class Experiment:
    """A submitted (or earlier) experiment, by name, under the client's results root.

    Example::

        exp = client.submit("configs/iris_kfold.yaml")
        exp.wait()
        for row in exp.results():
            print(row["point"], row["fold"], row["accuracy"])

    A search (a config with a `search:` block)::

        exp = client.submit("configs/digits_nas.yaml")
        exp.wait()
        for trial in exp.best(3):
            print(trial["number"], trial["score"], trial["params"])
    """

    def __init__(self, client: Session, name: str):
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"Experiment({self.name!r}, results_root={str(self.client.results_root)!r})"

    @property
    def layout(self) -> Layout:
        return self.client.layout

    def is_search(self) -> bool:
        """Whether this experiment is a search (a `search:` block), once submitted."""
        return self.layout.search_config(self.name).exists()

    # -- reading -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What `orchestrator status NAME --json` prints: counts of runs and groups by
        state, and per group its folds (state, worker, attempt, elapsed, error) and
        metrics. ExperimentNotFound if nothing was submitted under this name.

        A search adds `search` (as `status --json`): strategy, metrics, directions,
        trials, proposed, complete, failed, pruned, running, queued, generation, best
        (number, values, params, point), stopped, finished, and `trial_details`. Its
        groups are those of the trials proposed so far (none before its first step)."""
        from ..errors import ExperimentNotFound
        from ..views.overview import experiment_status

        try:
            return experiment_status(self.layout, self.name)
        except ExperimentNotFound:
            if not self.is_search():
                raise
        # Submitted, but its first step (which writes the manifest) has not run yet.
        from ..views.search import search_status

        return {"experiment": self.name, "config": None, "runs": {}, "groups": {}, "group_details": [],
                "paused": None, "search": search_status(self.layout, self.name)}

    def done(self) -> bool:
        """Whether every group of the last submission is DONE, FAILED or CANCELLED; for a
        search, whether the search has ended (every trial ended, or it stopped)."""
        if self.is_search():
            return bool(self._search_progress()["finished"])
        from ..views.overview import group_summaries

        return all(g["state"] in FINAL for g in group_summaries(self.layout, self.name))

    def results(self) -> list[dict[str, Any]]:
        """The rows of final_results.csv (one per finished run) as records, with numbers,
        booleans and lists as Python values: experiment, dataset, point, seed, fold,
        run_id, group_id, accuracy, log_loss, macro_f1, holdout_accuracy, seconds,
        worker, device, attempt, and `param.<name>` for each stated parameter."""
        from ..collect.results import read_final_results

        return [{k: cell_value(v) for k, v in row.items()}
                for row in read_final_results(self.layout, self.name)]

    def dataframe(self) -> Any:
        """`results()` as a pandas DataFrame (pandas is optional: ImportError without it)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("Experiment.dataframe() needs pandas (pip install pandas); "
                              "Experiment.results() gives the same rows as records") from exc
        return pd.DataFrame.from_records(self.results())

    def files(self) -> dict[str, Any]:
        """Where everything is, as `status --json` reports it: `final_results`, `manifest`,
        `results_root`, and per group name its `dir`, `status_file`, `ensemble_files` and
        per fold its `files` (predictions.csv, probabilities.csv, ranks.csv,
        metadata.json) and `status_file`."""
        from ..views.overview import experiment_status

        st = experiment_status(self.layout, self.name, with_files=True)
        return {
            "final_results": st["final_results"], "manifest": st["manifest"],
            "results_root": st["results_root"],
            "groups": {g["name"]: {"dir": g["dir"], "status_file": g["status_file"],
                                   "ensemble_files": g["ensemble_files"],
                                   "folds": {f["fold"]: {"files": f["files"], "status_file": f["status_file"]}
                                             for f in g["folds"]}}
                       for g in st["group_details"]},
        }

    def best(self, k: int = 1, metric: str | None = None, on: str | None = None) -> list[dict[str, Any]]:
        """The `k` best DONE groups (parameter points and seeds) by a metric of their
        finalize: `on` "oof" (out-of-fold predictions, the default) or
        "ensemble_holdout"; `metric` accuracy (the default), macro_f1 (higher is better)
        or log_loss (lower is better). Each: name, group_id, params, metrics.

        For a search: its `k` best trials by the search's own metric and direction, best
        first, as `orchestrator search best NAME --top K --json` lists them (`metric`
        and `on` do not apply): number, generation, state, values (by metric), score
        (the first metric's value), params, point, error, and groups (each group's
        `dir`, `status.json`, `metrics.json`)."""
        if self.is_search():
            if metric is not None or on is not None:
                raise ValueError(f"{self.name!r} is a search: its trials are ranked by its own metric "
                                 "(best(k) without metric= or on=)")
            from ..search.client import best_report

            trials: list[dict[str, Any]] = best_report(self.layout, self.name, k)["trials"]
            return trials
        from ..dispatch.manifest import load_manifest
        from ..views.overview import group_summaries

        metric, on = metric or "accuracy", on or "oof"

        params = {g["group_id"]: g["runs"][0]["params"] for g in load_manifest(self.layout, self.name)["groups"]}
        scored = [g for g in group_summaries(self.layout, self.name)
                  if g["state"] == Status.DONE.value and metric in g["metrics"].get(on, {})]
        sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
        scored.sort(key=lambda g: sign * float(g["metrics"][on][metric]))
        return [{"name": g["name"], "group_id": g["group_id"], "params": params.get(g["group_id"], {}),
                 "metrics": g["metrics"]} for g in scored[:k]]

    # -- waiting -------------------------------------------------------------------
    def wait(self, timeout: float | None = None, progress: bool = True) -> dict[str, Any]:
        """Block until every group is DONE, FAILED or CANCELLED; returns `status()`.

        `progress`: a live bar in a terminal or a notebook (a line on stderr every 5 s
        elsewhere). TimeoutError after `timeout` seconds (the runs go on). A local
        cluster (orch.local) whose worker died: EnvironmentProblem.

        A search: until it has ended (every trial ended, or more than
        max_failed_trials failed: `status()["search"]["stopped"]` says so), with a
        progress line on stderr when it changes (as `orchestrator submit --wait`)."""
        from ..views.progress import wait

        if self.is_search():
            self._wait_search(timeout, progress)
        elif not self.done():
            live = self.client.live()
            console = _console(progress)
            deadline = None if timeout is None else time.monotonic() + timeout
            checker = self.client.checker(deadline, f"experiment {self.name!r}")
            last = [time.monotonic()]

            def check() -> None:
                checker()
                # The files are the record: a group that ended while the live state did
                # not hear of it (another Redis, keys expired) ends the wait as well.
                if time.monotonic() - last[0] > FILE_CHECK_SECONDS:
                    last[0] = time.monotonic()
                    if self.done():
                        raise _Ended

            with contextlib.suppress(_Ended):
                wait(live, [self.client.tracked(self.name)], console, check=check, lines=progress)
        return self.status()

    def _wait_search(self, timeout: float | None, progress: bool) -> None:
        from ..views.search import wait_searches

        if self.done():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        check = self.client.checker(deadline, f"search {self.name!r}")
        # wait_searches (shared with `submit --wait`) prints its lines on stderr.
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            wait_searches(self.layout, [self.name], check)

    def _search_progress(self) -> dict[str, Any]:
        from ..search.engine import progress, read_history
        from ..views.search import require_search

        return progress(require_search(self.layout, self.name), read_history(self.layout, self.name))

    # -- steering ------------------------------------------------------------------
    def cancel(self) -> dict[str, int]:
        """`orchestrator cancel`: queued runs CANCELLED, running ones stop at their next
        report. Counts: queued, running, groups. Submitting again resumes it."""
        from ..dispatch.steering import cancel_experiment

        leases, live, url = self.client.steering()
        with self.client.redis_errors(url):
            return cancel_experiment(self.layout, self.name, leases, live)

    def pause(self, now: bool = False) -> dict[str, Any]:
        """`orchestrator pause [--now]`: no new run starts; running ones finish (with
        `now`, they are handed back and start again on resume)."""
        from ..dispatch.steering import pause_experiment

        leases, _, url = self.client.steering()
        with self.client.redis_errors(url):
            return pause_experiment(self.layout, self.name, leases, now)

    def resume(self) -> dict[str, Any]:
        """`orchestrator resume`: parked runs go back to their queues."""
        from ..dispatch.canvas import unpark
        from ..dispatch.steering import resume_experiment

        leases, _, url = self.client.steering()
        with self.client.redis_errors(url):
            return resume_experiment(self.layout, self.name, leases, unpark)

    def paused(self) -> bool:
        from ..dispatch.steering import paused_info

        return paused_info(self.layout, self.name) is not None

    @property
    def final_results(self) -> Path:
        return self.layout.final_results(self.name)


class _Ended(Exception):
    """Every group is final according to the files: the wait is over."""


def _console(progress: bool) -> Any:
    from rich.console import Console

    if progress:
        return Console(stderr=True)
    return Console(file=io.StringIO(), force_terminal=False, force_jupyter=False)

