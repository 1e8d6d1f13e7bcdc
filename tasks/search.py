"""Search steps on the control side (orchestrator.search.engine does the work):

- `tasks.search_step`: one step of a search; sent by a submission and after each
  group of a search is finalized or fails.
- `advance_searches`: a watchdog chore, a step for every search that has not ended,
  so a search whose step messages were lost (a killed control worker) goes on.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from orchestrator.search.rungs import SEARCH_STEP

from . import app

log = logging.getLogger(__name__)
_finished: dict[str, tuple[float, int]] = {}  # experiment -> journal (mtime, size) when it ended


@functools.cache
def _services() -> tuple[Any, Any]:
    """(Layout, LiveState), made once per process (the watchdog steps every tick)."""
    from orchestrator.livestate import LiveState
    from orchestrator.paths import Layout

    return Layout(app.conf.orch_results_root), LiveState.from_url(app.conf.orch_state_url)


def _publish(experiment: str, plans: list[Any]) -> None:
    from orchestrator.dispatch.canvas import prepare, publish

    layout, live = _services()
    prepare(layout, live, experiment, plans)
    publish(plans, {s.run_id: s.to_dict() for p in plans for s in p.specs})


def run_step(experiment: str, republish: bool | float = False) -> dict[str, Any]:
    from orchestrator.search.engine import step

    layout, live = _services()
    return step(layout, experiment, _publish, live, republish=republish)


@app.task(name=SEARCH_STEP, bind=True, ignore_result=True)
def search_step(self: Any, experiment: str, republish: Any = False) -> dict[str, Any]:
    """One idempotent step of the search `experiment` (orchestrator.search.engine.step).
    `republish`: a submission's time (publish again what was published before it), or
    true (everything in flight), or false."""
    import math

    from orchestrator.experiment.names import check_name

    check_name(str(experiment), "experiment")  # from the broker: a name, never a path
    if isinstance(republish, int | float) and not isinstance(republish, bool) and math.isfinite(republish):
        return run_step(experiment, float(republish))
    return run_step(experiment, republish is True)


def after_group(specs: Any) -> None:
    """After a group's callback: a step of its search, if its experiment is one."""
    try:
        experiment = specs[0]["experiment"]
        if _services()[0].search_config(experiment).exists():
            app.send_task(SEARCH_STEP, args=(experiment,), queue="control")
    except Exception:  # the group is recorded; the watchdog's chore steps the search too
        log.exception("could not send a search step")


def advance_searches() -> list[str]:
    """Watchdog chore: a step for each search under the results root that has not ended."""
    layout = _services()[0]
    done: list[str] = []
    for config in sorted(layout.root.glob("*/search/search.json")):
        experiment = config.parent.parent.name
        journal = layout.search_journal(experiment)
        try:
            st = os.stat(journal)
            stamp = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = (0.0, 0)
        if _finished.get(experiment) == stamp:
            continue
        try:
            state = run_step(experiment)
        except Exception:
            log.exception("search %s: step failed", experiment)
            continue
        if state.get("finished"):
            _finished[experiment] = stamp
    return done
