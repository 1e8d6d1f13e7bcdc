"""The experiment manifest: <root>/<experiment>/experiment.json, what the last
submission of an experiment contained (every run spec, by group). `status` and the
run summary read it; `submit` and `run` write it."""

from __future__ import annotations

import time
from typing import Any

from ..errors import ExperimentNotFound
from ..experiment.config import Experiment
from ..experiment.plan import GroupPlan
from ..experiment.spec import canonical_json
from ..paths import Layout, atomic_write_bytes, read_json


def experiments(layout: Layout) -> list[str]:
    if not layout.root.is_dir():
        return []
    return sorted(p.parent.name for p in layout.root.glob("*/experiment.json"))


def load_manifest(layout: Layout, experiment: str) -> dict[str, Any]:
    data = read_json(layout.manifest(experiment))
    if not isinstance(data, dict):
        known = ", ".join(experiments(layout)) or "none"
        raise ExperimentNotFound(f"no experiment {experiment!r} under {layout.root} "
                                 f"(experiments there: {known})")
    return data


def write_manifest(layout: Layout, exp: Experiment, plans: list[GroupPlan]) -> dict[str, dict[str, Any]]:
    """<root>/<experiment>/experiment.json: what the last submission contained. Compact
    JSON: it is read by programs, and can hold thousands of specs. Returns each run's
    dict by run_id (built once: the canvas sends the same dicts)."""
    return write_manifest_of(layout, exp.name, exp.file, exp.trainer.name, plans)


def write_manifest_of(layout: Layout, name: str, config: str, trainer: str,
                      plans: list[GroupPlan], extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """write_manifest from its parts (a search step has no Experiment, only its records);
    `extra`: more top-level keys (a search's summary)."""
    dicts = {s.run_id: s.to_dict() for p in plans for s in p.specs}
    content = {
        **(extra or {}),
        "experiment": name, "config": config, "trainer": trainer,
        "results_root": str(layout.root),
        "groups": [{
            "group_id": p.first.group_id, "name": p.first.group_name, "dir": p.first.group_dir,
            "run_ids": sorted(s.run_id for s in p.specs), "runs": [dicts[s.run_id] for s in p.specs],
        } for p in plans],
    }
    previous = read_json(layout.manifest(name))
    if isinstance(previous, dict) and {k: v for k, v in previous.items() if k != "submitted_at"} == content:
        return dicts  # the same submission again: leave the file (and its time) alone
    atomic_write_bytes(layout.manifest(name),
                       canonical_json({**content, "submitted_at": time.time()}).encode())
    return dicts
