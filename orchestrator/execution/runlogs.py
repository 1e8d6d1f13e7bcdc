"""Each attempt's stdout and stderr, kept next to the run's outputs, and found again.

On a worker, `capture` points file descriptors 1 and 2 (and sys.stdout/sys.stderr) of
the training process at `<group>/logs/fold_<i>.attempt_<n>.log` for the attempt, so
prints, warnings, C-level output and child processes all land there. When the attempt
ends, the log's tail also goes to Redis (`orch:log:<run_key>:<n>`), so `orchestrator
logs` can show a run trained on a host whose disk is not shared.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import redis

from .. import keys
from ..errors import OrchestratorError
from ..experiment.spec import RunSpec
from ..paths import Layout

TAIL_BYTES = 64 * 1024
LOG_TTL = 7 * 24 * 3600



@contextlib.contextmanager
def capture(path: Path) -> Iterator[Path]:
    """Send this process's stdout/stderr to `path` (appended) until the block ends; an
    exception escaping the block is written there too, with its traceback."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:  # the group's first log: make its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    saved = [os.dup(1), os.dup(2)]
    old_streams = sys.stdout, sys.stderr
    text = io.TextIOWrapper(os.fdopen(os.dup(fd), "wb", buffering=0), write_through=True,
                            line_buffering=True, errors="replace")
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = text
        try:
            yield path
        except BaseException as exc:
            with contextlib.suppress(Exception):
                text.write("".join(traceback.format_exception(exc)))
            raise
    finally:
        with contextlib.suppress(Exception):
            text.flush()
        sys.stdout, sys.stderr = old_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)
        with contextlib.suppress(Exception):
            text.close()


def read_tail(path: Path) -> bytes | None:
    """The last TAIL_BYTES of an attempt's log (what goes to Redis for other hosts, under
    `log_key`, for LOG_TTL seconds), or None if there is no log."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
            return fh.read()
    except OSError:
        return None


def find_run(layout: Layout, ident: str) -> RunSpec:
    """A run by its readable name (exp/dataset/point/seed=S/fold=F) or run_id (or a
    unique prefix of it, at least 6 characters), from the experiments' manifests."""
    from ..dispatch.manifest import experiments, load_manifest

    matches: dict[str, RunSpec] = {}
    for exp in experiments(layout):
        if "/" in ident and not ident.startswith(exp + "/"):
            continue
        for group in load_manifest(layout, exp).get("groups", []):
            for data in group.get("runs", []):
                spec = RunSpec.from_dict(data)
                if spec.name == ident or spec.run_id == ident or (
                        len(ident) >= 6 and spec.run_id.startswith(ident)):
                    matches[spec.run_id] = spec
    if not matches:
        raise OrchestratorError(f"no run {ident!r} under {layout.root}: give a run name as "
                                "`orchestrator status EXPERIMENT` shows it, or its run_id")
    if len(matches) > 1:
        names = ", ".join(sorted(s.name for s in matches.values())[:5])
        raise OrchestratorError(f"{ident!r} matches {len(matches)} runs ({names}...): give more of it")
    return next(iter(matches.values()))


def attempt_logs(layout: Layout, spec: RunSpec, client: redis.Redis | None) -> dict[int, tuple[str, bytes]]:
    """attempt -> (where it came from, content): files under the results root, else the
    tails kept in Redis."""
    found: dict[int, tuple[str, bytes]] = {}
    folder = layout.logs_dir(spec)
    for path in sorted(folder.glob(f"fold_{spec.fold}.attempt_*.log")) if folder.is_dir() else []:
        try:
            attempt = int(path.name.rsplit("_", 1)[1].split(".")[0])
            found[attempt] = (str(path), path.read_bytes())
        except (ValueError, OSError):
            continue
    if client is not None:
        with contextlib.suppress(redis.RedisError):
            for key in client.scan_iter(keys.logs_of(spec.run_key)):
                attempt = int(key.decode().rsplit(":", 1)[1])
                if attempt not in found:
                    data = cast(Any, client.get(key))
                    if data is not None:
                        found[attempt] = (f"redis {key.decode()} (last {TAIL_BYTES // 1024} KiB)", data)
    return dict(sorted(found.items()))
