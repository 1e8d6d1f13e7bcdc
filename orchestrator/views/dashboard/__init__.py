"""`orchestrator watch`: what the cluster is doing now, as one screen.

Three parts, so that the screen can be tested without Redis:

- snapshot: `Collector.collect()` reads Redis (run and group states, run leases, trainer
  progress, the worker registry, the gangs of data-parallel runs and their ranks) and the results root (manifests, pause markers) into a
  `Snapshot` of plain dataclasses. It never talks to Flower or Celery.
- render: `render(snapshot, width, height)` turns a snapshot into a rich renderable that
  fits `width` columns and `height` rows: every line is cut (with "…") rather than wrapped.
- screen: `watch()` runs them: a background thread collects every `interval` seconds, the
  main thread redraws a full-screen `rich.live.Live` and reads keys in cbreak mode.
"""

from .render import bar, describe_progress, duration, frame_text, gib, render, shorten
from .screen import once, redis_client, watch
from .snapshot import (
    Collector,
    ExperimentRow,
    FailureRow,
    GangRow,
    RankRow,
    RateWindow,
    Snapshot,
    WorkerRow,
    first_line,
)

__all__ = ["Collector", "ExperimentRow", "FailureRow", "GangRow", "RankRow", "RateWindow", "Snapshot", "WorkerRow", "bar", "describe_progress", "duration", "first_line", "frame_text", "gib", "once", "redis_client", "render", "shorten", "watch"]
