"""The dashboard's rendering: a Snapshot as lines that fit the screen, cut rather than wrapped."""

from __future__ import annotations

import io
import math
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.text import Text

from .snapshot import PROGRESS_META, ExperimentRow, GangRow, Snapshot, WorkerRow

# --- rendering ------------------------------------------------------------------

def duration(seconds: float | None) -> str:
    """At most 5 characters: 42s, 9m05s, 12m, 3h05m, 99h59m is 5 too, then 4d."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 10 * 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s < 100 * 3600:
        return f"{s // 3600}h"
    return f"{min(s // 86400, 9999)}d"


def shorten(name: str, width: int) -> str:
    """A run name cut to `width`, keeping its first part (the experiment) and as many of
    its last parts as fit (seed, fold): `iris_sweep/…/seed=0/fold=3`."""
    if len(name) <= width:
        return name
    if width <= 1:
        return "…"[:width]
    parts = name.split("/")
    for k in range(len(parts) - 2, 0, -1):
        candidate = f"{parts[0]}/…/{'/'.join(parts[-k:])}"
        if len(candidate) <= width:
            return candidate
    tail = parts[-1]
    head = width - len(tail) - 2
    if len(parts) == 1 or head < 4:
        return name[:width - 1] + "…"
    return f"{name[:head]}…/{tail}"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def describe_progress(report: dict[str, Any], width: int = 80) -> str:
    """`ep 3 train_loss=0.4312` or `step 41`: epoch or step, then the trainer's first
    metric. Too long for `width`: the metric's name is cut, never its value."""
    parts = []
    if "epoch" in report:
        parts.append(f"ep {_number(report['epoch'])}")
    if "step" in report:
        parts.append(f"step {_number(report['step'])}")
    for key, value in report.items():
        if key in PROGRESS_META or key in ("epoch", "step"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = _number(value)
            room = width - len(" ".join(parts)) - (1 if parts else 0) - len(number) - 1
            if room >= len(key):
                parts.append(f"{key}={number}")
            elif room >= 2:
                parts.append(f"{key[:room - 1]}…={number}")
            break
    return " ".join(parts)


def gib(mb: int | None) -> str:
    if mb is None:
        return "?"
    value = mb / 1024
    return f"{value:.1f}" if value < 99.95 else f"{value:.0f}"


def _cell(text: str | Text, width: int, right: bool = False) -> Text:
    """`text` in exactly `width` columns: cut with "…" or padded."""
    cell = text.copy() if isinstance(text, Text) else Text(text)
    cell.truncate(width, overflow="ellipsis")
    cell.align("right" if right else "left", width)
    return cell


def _line(*cells: Text) -> Text:
    return Text(" ").join(cells)


def bar(row: ExperimentRow, width: int, ascii_only: bool = False) -> Text:
    """done █ (green), failed or cancelled ▓ (red), running ▒ (yellow), pending ░."""
    chars = "#x>-" if ascii_only else "█▓▒░"
    if width <= 0:
        return Text()
    total = max(row.total, 1)
    cuts = []
    acc = 0
    for count in (row.done, row.failed + row.cancelled, row.running):
        acc += count
        cuts.append(min(width, int(acc * width / total)))
    done_w, failed_w, running_w = cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1]
    if row.running and running_w == 0 and cuts[2] < width:  # running runs always show
        running_w = 1
    rest = max(0, width - done_w - failed_w - running_w)
    return Text.assemble((chars[0] * done_w, "green"), (chars[1] * failed_w, "red"),
                         (chars[2] * running_w, "yellow"), (chars[3] * rest, "bright_black"))


def _experiment_lines(snap: Snapshot, width: int, limit: int | None, ascii_only: bool) -> list[Text]:
    rows = snap.experiments
    if not rows:
        where = f"experiment {snap.focus!r}" if snap.focus else "experiments"
        return [Text(f"no {where} under {snap.results_root} (orchestrator submit CONFIG adds one)",
                     style="yellow")]
    count_w = max(5, *(len(f"{r.done}/{r.total}") for r in rows))
    # Columns after the bar; on a narrow terminal RUNNING, then FAILED, give way (the bar
    # still shows them).
    columns = {"DONE": count_w, "FAILED": 6, "RUNNING": 7, "ETA": 6}
    for optional in ("RUNNING", "FAILED"):
        if width - sum(columns.values()) - len(columns) < 30:
            del columns[optional]
    fixed = sum(columns.values()) + len(columns)  # with the separator before each
    name_w = max(6, min(max(len(r.name) for r in rows), 24, (width - fixed) // 2))
    bar_w = max(0, width - fixed - name_w - 1)
    lines = [_line(_cell("EXPERIMENT", name_w), _cell("PROGRESS", bar_w),
                   *(_cell(title, w, True) for title, w in columns.items()))]
    lines[0].stylize("bold")
    shown = rows if limit is None or len(rows) <= limit else rows[:max(0, limit - 1)]
    for r in shown:
        failed = r.failed + r.cancelled
        if r.paused:
            eta = Text("PAUSED", style="bold yellow")
        elif r.remaining == 0:
            eta = Text("done", style="green")
        else:
            eta = Text(duration(r.eta))
        values = {"DONE": Text(f"{r.done}/{r.total}"),
                  "FAILED": Text(str(failed), style="red" if failed else ""),
                  "RUNNING": Text(str(r.running), style="yellow" if r.running else ""), "ETA": eta}
        lines.append(_line(_cell(Text(r.name, style="bold"), name_w), bar(r, bar_w, ascii_only),
                           *(_cell(values[title], w, True) for title, w in columns.items())))
        if r.search:
            lines.append(Text(f"  {r.search}"[:width], style="cyan"))
    if len(shown) < len(rows):
        hidden = rows[len(shown):]
        lines.append(Text(f"… and {len(hidden)} more ({sum(1 for r in hidden if r.remaining == 0)} finished)",
                          style="bright_black"))
    return lines


_STATE_STYLE = {"busy": "green", "idle": "bright_black", "stopping": "yellow", "stale": "bold red",
                "gone": "bold red"}


def _note(r: WorkerRow) -> str:
    """What the PROGRESS column says instead of progress, about a worker in trouble."""
    if r.state == "stale" and r.heartbeat_age is not None:
        return f"no heartbeat {duration(r.heartbeat_age)}"
    if r.state == "gone":
        return "no worker record"
    return ""


def _worker_lines(snap: Snapshot, width: int, limit: int | None) -> list[Text]:
    rows = snap.workers
    if not rows:
        return [Text(f"no live workers registered on {snap.url}", style="yellow")]
    with_gpu = any(r.memory_total_mb is not None for r in rows)
    with_util = with_gpu and width >= 100
    name_w = max(6, min(max(len(r.name) for r in rows), 14))
    fixed = [name_w, 3, 5, 5] + ([9] if with_gpu else []) + ([4] if with_util else [])
    if with_gpu and width - sum(fixed) - (len(fixed) + 1) < 24:  # narrow: memory goes first
        with_gpu, fixed = False, fixed[:4]
    flex = max(16, width - sum(fixed) - (len(fixed) + 1))  # the rest, less the separators
    needed = max((len(_note(r) or describe_progress(r.progress)) for r in rows), default=0)
    prog_w = max(8, min(24, flex // 2, needed))
    run_w = flex - prog_w
    head = [_cell("WORKER", name_w), _cell("GPU", 3), _cell("STATE", 5), _cell("RUN", run_w),
            _cell("PROGRESS", prog_w), _cell("TIME", 5, True)]
    if with_gpu:
        head.append(_cell("MEM GiB", 9, True))
    if with_util:
        head.append(_cell("UTIL", 4, True))
    lines = [_line(*head)]
    lines[0].stylize("bold")
    # One experiment on screen: its name, already above, is left out of the run names.
    prefix = f"{snap.experiments[0].name}/" if len(snap.experiments) == 1 else None
    shown = rows if limit is None or len(rows) <= limit else rows[:max(0, limit - 1)]
    for r in shown:
        gpu = str(r.gpu) if r.gpu is not None else {"control": "ctl", "cpu": "cpu"}.get(r.device, "?")
        state = "stop" if r.state == "stopping" else r.state
        if r.run:
            # A rank's tag (snapshot._with_ranks) stays whole; the run name after it is cut.
            tag, name = ("", r.run) if not r.run.startswith("[rank ") or "] " not in r.run else \
                (r.run[:r.run.index("] ") + 2], r.run[r.run.index("] ") + 2:])
            name = name[len(prefix):] if prefix and name.startswith(prefix) else name
            room = run_w - len(tag) - (3 if r.more_runs else 0)
            run = tag + shorten(name, max(1, room)) + (f" +{r.more_runs}" if r.more_runs else "")
            prog = describe_progress(r.progress, prog_w)
            elapsed = duration(snap.taken_at - r.run_started) if r.run_started else "?"
        else:
            run, prog, elapsed = "", "", ""
        prog = _note(r) or prog
        cells = [_cell(r.name, name_w), _cell(gpu, 3), _cell(Text(state, style=_STATE_STYLE.get(r.state, "")), 5),
                 _cell(run, run_w), _cell(prog, prog_w), _cell(elapsed, 5, True)]
        if with_gpu:
            mem = (f"{gib(r.memory_used_mb)}/{gib(r.memory_total_mb)}"
                   if r.memory_total_mb is not None else "")
            cells.append(_cell(mem, 9, True))
        if with_util:
            cells.append(_cell(f"{r.utilization}%" if r.utilization is not None else "", 4, True))
        lines.append(_line(*cells))
    if len(shown) < len(rows):
        lines.append(Text(f"… and {len(rows) - len(shown)} more workers", style="bright_black"))
    return lines


def _gang_line(g: GangRow, width: int, prefix: str | None) -> Text:
    name = g.run[len(prefix):] if prefix and g.run.startswith(prefix) else g.run
    about = [f"gang {g.state or '?'}", f"attempt {g.attempt or '-'}", f"{g.world or '?'} ranks"]
    if g.why:
        about.append(g.why)
    tail = " · " + " · ".join(about)
    line = Text.assemble((shorten(name, max(12, width - len(tail))), "bold"), tail)
    if g.why and g.state != "waiting":  # aborted: this attempt is stopping
        line.stylize("red", line.plain.index(g.why))
    return line


def _gang_lines(snap: Snapshot, width: int, limit: int | None) -> list[Text]:
    """Each data-parallel run held now, its gang, and one line per rank of its current
    attempt: worker, host, GPU, step, last heartbeat, attempt."""
    if not snap.gangs:
        return []
    name_w = max(6, min(max((len(r.worker) for g in snap.gangs for r in g.ranks), default=6), 16))
    host_w = max(4, min(max((len(r.host or "") for g in snap.gangs for r in g.ranks), default=4), 14))
    columns = [("DATA-PARALLEL", 13, False), ("WORKER", name_w, False), ("HOST", host_w, False),
               ("GPU", 3, False), ("STEP", 9, False), ("BEAT", 6, True), ("ATTEMPT", 7, True)]
    lines = [_line(*(_cell(title, w, right) for title, w, right in columns))]
    lines[0].stylize("bold")
    prefix = f"{snap.experiments[0].name}/" if len(snap.experiments) == 1 else None
    for g in snap.gangs:
        lines.append(_gang_line(g, width, prefix))
        for r in g.ranks:
            beat = "?" if r.beat_age is None else (f"{r.beat_age:.1f}s" if r.beat_age < 60 else duration(r.beat_age))
            values: list[str | Text] = [f"  rank {r.rank}", r.worker, r.host or "?", r.gpu if r.gpu is not None else "-",
                      f"step {r.step}" if r.step is not None else "joining",
                      Text(beat, style="bold red" if r.late else ""), str(r.attempt or "?")]
            lines.append(_line(*(_cell(v, w, right) for v, (_, w, right) in zip(values, columns, strict=True))))
    if limit is not None and len(lines) > limit:
        keep = max(0, limit - 1)
        lines = [*lines[:keep], Text(f"… and {len(lines) - keep} more lines of ranks", style="bright_black")]
    return lines


def _failure_lines(snap: Snapshot, width: int, limit: int | None) -> list[Text]:
    if not snap.failures:
        return []
    title = f"RECENT FAILURES ({snap.failed_total} failed run{'s' if snap.failed_total != 1 else ''})"
    lines = [Text(title, style="bold red")]
    shown = snap.failures if limit is None else snap.failures[:max(0, limit)]
    name_w = max(10, min(max(len(f.name) for f in shown) if shown else 10, width // 3))
    for f in shown:
        at = time.strftime("%H:%M:%S", time.localtime(f.at)) if f.at else "--:--:--"
        error_w = max(0, width - 8 - name_w - 2)
        lines.append(_line(_cell(at, 8), _cell(shorten(f.name, name_w), name_w),
                           _cell(Text(f.error, style="red"), error_w)))
    return lines


def _allot(height: int, wanted: list[int], minimum: list[int], order: list[int]) -> list[int]:
    """Rows per section out of `height`: first each its minimum (or what it wants, if
    less) while rows are left, then the rest section by section in `order`."""
    got = [0] * len(wanted)
    left = height
    for i in range(len(wanted)):
        got[i] = min(wanted[i], minimum[i], left)
        left -= got[i]
    for i in order:
        extra = min(wanted[i] - got[i], left)
        got[i] += extra
        left -= extra
    return got


def render(snap: Snapshot, width: int = 80, height: int | None = None, ascii_only: bool = False,
           interval: float | None = None) -> RenderableType:
    """The screen: header, experiments, workers, recent failures, a key hint. Every line
    fits `width` columns; with `height`, sections are cut to fit ("… and N more")."""
    width = max(20, width)
    when = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    title = Text.assemble(("orchestrator watch", "bold"), " ", snap.url)
    title.truncate(max(1, width - len(when) - 1), overflow="ellipsis")
    header = [Text.assemble(title, " " * max(1, width - title.cell_len - len(when)), when)]
    busy = sum(1 for w in snap.workers if w.run)
    unfinished = sum(1 for e in snap.experiments if e.remaining)
    header.append(Text(
        f"{len(snap.workers)} worker{'s' if len(snap.workers) != 1 else ''} ({busy} training) · "
        f"{unfinished}/{len(snap.experiments)} experiments unfinished · "
        f"{sum(e.running for e in snap.experiments)} running · {snap.failed_total} failed",
        style="bright_black"))
    if snap.error:
        since = f" (since {time.strftime('%H:%M:%S', time.localtime(snap.error_since))})" if snap.error_since else ""
        header.append(Text(snap.error + since, style="bold red"))
    footer = Text("q quit" + (f" · refresh every {interval:g}s" if interval else "")
                  + f" · results {snap.results_root}", style="bright_black")

    n_fail = len(snap.failures) + 1 if snap.failures else 0
    n_gang = 1 + sum(1 + len(g.ranks) for g in snap.gangs) if snap.gangs else 0
    wanted = [len(snap.experiments) + 1, len(snap.workers) + 1, n_fail, n_gang]
    if height is None:
        limits: list[int | None] = [None, None, None, None]
    else:
        # header, footer, a blank line before each section
        fixed = len(header) + 1 + 3 + (1 if n_gang else 0)
        got = _allot(max(0, height - fixed), [max(2, wanted[0]), max(2, wanted[1]), wanted[2], wanted[3]],
                     [3, 3, 2, 3], order=[1, 0, 3, 2])
        limits = [max(1, got[0] - 1), max(1, got[1] - 1), max(0, got[2] - 1), got[3]]
    parts: list[Text] = [*header, Text()]
    parts += _experiment_lines(snap, width, limits[0], ascii_only)
    parts.append(Text())
    parts += _worker_lines(snap, width, limits[1])
    gangs = _gang_lines(snap, width, limits[3])
    if gangs and (limits[3] is None or limits[3] > 0):
        parts += [Text(), *gangs]
    failures = _failure_lines(snap, width, limits[2])
    if failures and (limits[2] is None or limits[2] > 0):
        parts += [Text(), *failures]
    parts.append(footer)
    for p in parts:
        p.no_wrap = True
        p.overflow = "ellipsis"
        p.truncate(width, overflow="ellipsis")
    return Group(*parts)


def frame_text(snap: Snapshot, width: int = 80, height: int | None = None, ascii_only: bool = False) -> str:
    """The screen as plain text (tests, docs/watching.md, `--once` into a pipe)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render(snap, width, height, ascii_only))
    return console.export_text()
