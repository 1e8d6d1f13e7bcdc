"""The stop of a pruned trial's runs (ASHA, orchestrator.search.asha decides): as a
cancel stops a run, one run at a time. Each fold not ended is recorded CANCELLED with
the reason, under the results root and in Redis's fold record that return-mode workers
read, then the lease of an attempt training it is revoked (orchestrator.search.rungs
has the other direction: a run's reports at its rungs). Control side only."""

from __future__ import annotations

import time
from typing import Any

from ..experiment.spec import RunSpec


def stop(layout: Any, live: Any, specs: list[RunSpec], why: str) -> int:
    """Stop these runs (a pruned trial's): each fold not ended is recorded CANCELLED
    with `why`, then the lease of any attempt training it is revoked. Idempotent.
    Returns how many attempts were told to stop."""
    from ..collect.status import Status, fold_state, write_fold_status
    from ..execution.leases import Leases
    from ..execution.returns import Returns

    ended = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)
    now = time.time()
    marked = {}
    returns = Returns(live.client)
    for spec in specs:
        state, record = fold_state(layout, spec)
        if state not in ended:
            record = write_fold_status(layout, spec, Status.CANCELLED, base=record or None, error=why,
                                       finished_at=now)
            # A worker without the results root (return mode) reads the fold's record
            # from Redis: it must find the run CANCELLED there too.
            returns.write_record(spec, record)
            marked[spec.run_id] = Status.CANCELLED.value
    # After the records: an attempt that claims the run from now on finds it CANCELLED;
    # one that claimed it before holds a lease, which is revoked here.
    leases = Leases(live.client)
    active = leases.active()
    stopped = 0
    for spec in specs:
        entry = active.get(spec.run_key) or {}
        if entry.get("token"):
            stopped += leases.revoke(spec.run_key, entry["token"], why=why)
    if marked:
        by_exp: dict[str, dict[str, str]] = {}
        for spec in specs:
            if spec.run_id in marked:
                by_exp.setdefault(spec.experiment, {})[spec.run_id] = marked[spec.run_id]
        for experiment, states in by_exp.items():
            live.set_runs(experiment, states)
    return stopped
