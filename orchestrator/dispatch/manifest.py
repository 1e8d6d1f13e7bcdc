"""The experiment manifest: <root>/<experiment>/experiment.json, what the last
submission of an experiment contained (every run spec, by group). `status` and the
run summary read it; `submit` and `run` write it. Evaluations from the Python API
(`Client.evaluate`) add their groups to it instead (`add_to_manifest`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ExperimentNotFound, Problem
from ..experiment.config import Experiment
from ..experiment.plan import GroupPlan
from ..experiment.spec import canonical_json
from ..paths import Layout, atomic_write_bytes, file_lock, read_json


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


@dataclass
class _Listed:
    """A manifest as this process last wrote it through add_to_manifest: its other keys,
    each group's canonical JSON, and the folder -> group_id of each. Valid while the file
    is exactly that version (`stamp`): evaluations one after another then cost one write
    of the text, not a parse and a serialisation of every group listed (1000 of them:
    ~25 ms a call)."""

    stamp: tuple[int, ...]
    head: dict[str, Any]
    groups: list[str]
    dirs: dict[str, str] = field(default_factory=dict)


_listed: dict[Path, _Listed] = {}


def _stamp(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def _manifest_text(head: dict[str, Any], groups: list[str]) -> str:
    """canonical_json({**head, "groups": [...]}), from each group's canonical JSON."""
    parts = {k: canonical_json(v) for k, v in head.items()}
    parts["groups"] = "[" + ",".join(groups) + "]"
    return "{" + ",".join(f"{canonical_json(k)}:{parts[k]}" for k in sorted(parts)) + "}"


def add_to_manifest(layout: Layout, exp: Experiment, plans: list[GroupPlan]) -> dict[str, dict[str, Any]]:
    """Add the plans' groups to the experiment's manifest, keeping the groups it lists
    (one evaluation after another of `Client.evaluate`, from any number of processes:
    under a lock). A group already listed is left as it is. Returns each run's dict by
    run_id, as write_manifest does. Two groups with different runs in one folder (params
    that differ only as 1 and 1.0 do) would overwrite each other's files: a ConfigError."""
    dicts = {s.run_id: s.to_dict() for p in plans for s in p.specs}
    path = layout.manifest(exp.name)
    with file_lock(layout.manifest_lock(exp.name)):
        stamp = _stamp(path)
        listed = _listed.pop(path, None)
        if listed is None or listed.stamp != stamp:  # another process wrote it: read it again
            previous = read_json(path) if stamp else None
            if isinstance(previous, dict) and isinstance(previous.get("groups"), list):
                groups = [g for g in previous.pop("groups") if isinstance(g, dict)]
                listed = _Listed(stamp or (), previous, [canonical_json(g) for g in groups],
                                 {str(g.get("dir")): str(g.get("group_id")) for g in groups})
            else:
                listed = _Listed((), {"experiment": exp.name, "config": exp.file,
                                      "trainer": exp.trainer.name, "results_root": str(layout.root)}, [])
        added = stamp is None
        for p in plans:
            first = p.first
            if first.group_dir in listed.dirs:
                if listed.dirs[first.group_dir] != first.group_id:
                    raise ConfigError([Problem(exp.file, "params", (
                        f"{first.group_name} would share its folder {first.group_dir} with another "
                        "evaluation whose params differ only in how they are written (1 and 1.0, "
                        "'1' and 1): write them the same way"))])
                continue
            listed.groups.append(canonical_json({
                "group_id": first.group_id, "name": first.group_name, "dir": first.group_dir,
                "run_ids": sorted(s.run_id for s in p.specs), "runs": [dicts[s.run_id] for s in p.specs]}))
            listed.dirs[first.group_dir] = first.group_id
            added = True
        if added:
            listed.head["submitted_at"] = time.time()
            atomic_write_bytes(path, _manifest_text(listed.head, listed.groups).encode())
            listed.stamp = _stamp(path) or ()
        _listed[path] = listed
    return dicts
