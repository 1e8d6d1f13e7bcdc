"""Where a roles experiment's files go under the results root (atomic writes only):

    <root>/<experiment>/experiment.json              manifest (kind: roles, the role specs)
    <root>/<experiment>/roles/status.json            state: RUNNING, DONE, CANCELLED, FAILED (a role gave up); why; when
    <root>/<experiment>/roles/weights/v<n>.npz       each published version (a checkpoint file)
    <root>/<experiment>/roles/weights/v<n>.json      its meta (step, checksum, attempt)
    <root>/<experiment>/roles/evaluations.csv        one row per evaluated version
    <root>/<experiment>/roles/winrate.png            `orchestrator report`: scores per version
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..paths import Layout, atomic_write_bytes, atomic_write_json, read_json

EVAL_COLUMNS = ["version", "step", "games", "win_random", "draw_random", "loss_random",
                "win_best", "draw_best", "loss_best", "best_version", "evaluated_at"]


class RolesFiles:
    def __init__(self, layout: Layout, experiment: str):
        self.layout, self.experiment = layout, experiment
        self.dir = layout.experiment_dir(experiment) / "roles"

    def status_path(self) -> Path:
        return self.dir / "status.json"

    def checkpoint(self, version: int) -> Path:
        return self.dir / "weights" / f"v{int(version):08d}.npz"

    def evaluations_path(self) -> Path:
        return self.dir / "evaluations.csv"

    def plot_path(self) -> Path:
        return self.dir / "winrate.png"

    def write_status(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.status_path(), data)

    def status(self) -> dict[str, Any] | None:
        got = read_json(self.status_path())
        return got if isinstance(got, dict) else None

    def write_checkpoint(self, version: int, data: bytes | memoryview, meta: dict[str, Any]) -> Callable[[], None]:
        """The version's file and its meta; returns what removes them (a refused flip)."""
        path = self.checkpoint(version)
        atomic_write_bytes(path, bytes(data))
        atomic_write_json(path.with_suffix(".json"), meta)

        def remove() -> None:
            for p in (path, path.with_suffix(".json")):
                p.unlink(missing_ok=True)

        return remove

    def write_evaluations(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=EVAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: int(r["version"])):
            writer.writerow(row)
        atomic_write_bytes(self.evaluations_path(), buf.getvalue().encode())
