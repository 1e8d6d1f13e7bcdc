"""A search's durable record: <root>/<experiment>/search/journal.jsonl, one JSON entry
per line, appended by the search steps (one at a time: the search's lock).

Entries: `trial` (a proposal, written before anything is published: write-ahead),
`published` (its groups went to the broker), `result` (COMPLETE with its values, or
FAILED with its error, or PRUNED by ASHA), `generation` (evolution: which trials are the
elites carried into a generation), `rung` (ASHA: a trial's reported value at a rung
epoch), `stopped` (ASHA: the runs of these pruned trials were told to stop). Everything a step decides is derived from these
entries and the seed, so a step re-run after a kill at any point decides the same.

Appending is the one write under the results root that is not a rename: a log grows
with every trial, and rewriting it whole would cost O(trials) per step. A line is one
write() followed by an fsync; a kill can at worst leave a torn last line, which has no
newline and does not parse: readers skip it, and the next append first cuts it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..paths import FSYNC

RUNNING, COMPLETE, FAILED, PRUNED = "RUNNING", "COMPLETE", "FAILED", "PRUNED"


@dataclass
class Trial:
    number: int
    generation: int
    params: dict[str, Any]  # what the trainer gets (on top of the experiment's params)
    raw: dict[str, Any]  # the strategy's own values (Optuna's params, a genome)
    point: str
    system_attrs: dict[str, Any] = field(default_factory=dict)  # Optuna's, told back
    published: bool = False
    published_at: float = 0.0  # when it was last published (the `published` entry's time)
    state: str = RUNNING
    values: list[float] | None = None
    error: str | None = None
    budget: int | None = None  # ASHA: the epochs it trained (its last rung when pruned)
    rungs: dict[int, float] = field(default_factory=dict)  # ASHA: rung epoch -> its reported value there
    stopped: bool = False  # ASHA: its runs were told to stop (a PRUNED trial)


@dataclass
class _Cached:
    stamp: tuple[int, int]  # (inode, size) of what was parsed
    entries: list[dict[str, Any]]


_cache: dict[Path, _Cached] = {}


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every complete entry, in order. Parsed once per process and then only what was
    appended since (the file only grows, until a new inode: a new search)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    cached = _cache.get(path)
    if cached is not None and cached.stamp == (st.st_ino, st.st_size):
        return cached.entries
    start, entries = 0, []
    if cached is not None and cached.stamp[0] == st.st_ino and cached.stamp[1] <= st.st_size:
        start, entries = cached.stamp[1], list(cached.entries)
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read()
    end = data.rfind(b"\n") + 1  # a torn last line (no newline) is not read
    for line in data[:end].splitlines():
        if line.strip():
            entries.append(orjson.loads(line))
    _cache[path] = _Cached((st.st_ino, start + end), entries)
    return entries


def append(path: Path, entries: list[dict[str, Any]], durable: bool = True) -> None:
    """Append entries as one write (cutting a torn last line first), made durable
    (fsync, with ORCH_FSYNC) unless `durable` is False."""
    if not entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for e in entries)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # a torn line: cut back to the last newline
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, size)
                size = text.rfind(b"\n") + 1
                os.ftruncate(fd, size)
        os.lseek(fd, size, os.SEEK_SET)
        os.write(fd, data)
        if FSYNC and durable:
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class History:
    """The trials of a search as its journal says, by number."""

    trials: dict[int, Trial] = field(default_factory=dict)
    elites: dict[int, list[int]] = field(default_factory=dict)  # generation -> elite trial numbers

    @property
    def ordered(self) -> list[Trial]:
        return [self.trials[n] for n in sorted(self.trials)]

    def count(self, *states: str) -> int:
        return sum(1 for t in self.trials.values() if t.state in states)


@dataclass
class _Applied:
    inode: int
    count: int  # entries applied
    history: History


_histories: dict[Path, _Applied] = {}


def load_history(path: Path) -> History:
    """history(read_entries(path)), kept per process and brought up to date with only
    the entries appended since (a step's passes read it several times: rebuilding it
    from 3,000 entries each time cost ~4 ms). The History is shared: read it, do not
    change it (but see `apply`)."""
    entries = read_entries(path)
    cached = _histories.get(path)
    inode = _cache[path].stamp[0] if path in _cache else -1
    if cached is None or cached.inode != inode or cached.count > len(entries):
        cached = _histories[path] = _Applied(inode, 0, History())
    for e in entries[cached.count:]:
        apply(cached.history, e)
    cached.count = len(entries)
    return cached.history


def forget_history(path: Path) -> None:
    _histories.pop(path, None)


def history(entries: list[dict[str, Any]]) -> History:
    h = History()
    for e in entries:
        apply(h, e)
    return h


def apply(h: History, e: dict[str, Any]) -> None:
    """One entry onto `h` (a `result` applied twice changes nothing the second time)."""
    kind = e.get("type")
    if kind == "trial":
        h.trials[e["number"]] = Trial(
            number=e["number"], generation=e.get("generation", 0), params=e["params"], raw=e["raw"],
            point=e["point"], system_attrs=e.get("system_attrs") or {})
    elif kind == "published":
        for n in e["numbers"]:
            if n in h.trials:
                h.trials[n].published, h.trials[n].published_at = True, float(e.get("t") or 0.0)
    elif kind == "result" and e["number"] in h.trials:
        t = h.trials[e["number"]]
        t.state, t.error = e["state"], e.get("error")
        if e.get("values") is not None:
            t.values = e["values"]
        if e.get("budget") is not None:
            t.budget = e["budget"]
    elif kind == "rung" and e["number"] in h.trials:  # ASHA
        t = h.trials[e["number"]]
        t.rungs[e["epoch"]] = e["value"]
        t.budget = max(t.rungs)
    elif kind == "stopped":
        for n in e["numbers"]:
            if n in h.trials:
                h.trials[n].stopped = True
    elif kind == "generation":
        h.elites[e["generation"]] = list(e["elites"])
