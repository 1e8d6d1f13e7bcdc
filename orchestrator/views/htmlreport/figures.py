"""The report's figures: matplotlib plots of the collected data, as PNGs."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...collect.results import cell_text
from ...collect.status import Status
from ...paths import read_json
from .data import (
    # metric -> True when higher is better (the fold metrics every run records).
    DONE,
    MAX_CONFUSION,
    MAX_GROUPS_PLOTTED,
    METRICS,
    Figure,
    GroupInfo,
    ReportData,
    as_number,
    param_key,
    ranked,
)


# -- 2. figures ------------------------------------------------------------------------
def make_figures(data: ReportData, metric: str = "accuracy") -> list[Figure]:
    """Every plot the data allows; a plot with nothing to show is left out (the HTML
    says why)."""
    figures = []
    for param in data.swept:
        fig = _metric_vs_param(data, metric, param)
        if fig:
            figures.append(fig)
    for fig in (_fold_scores(data, metric), _confusion(data, metric), _timeline(data)):
        if fig:
            figures.append(fig)
    return figures


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metric_vs_param(data: ReportData, metric: str, param: str) -> Figure | None:
    points: list[tuple[GroupInfo, Any, float]] = []
    for g in data.groups:
        score = g.score(metric)
        if score is not None:
            points.append((g, g.params.get(param), score))
    if not points:
        return None
    numeric = all(_is_number(v) for _, v, _ in points)
    fig = _new_figure(6.4, 3.8)
    ax = fig.add_subplot()
    datasets = list(dict.fromkeys(g.dataset for g, _, _ in points))
    categories = list(dict.fromkeys(param_key(v) for _, v, _ in points))
    log = False
    if numeric:
        values = [float(v) for _, v, _ in points]
        log = min(values) > 0 and max(values) / min(values) >= 10
    for i, ds in enumerate(datasets):
        color = f"C{i}"
        mine = [(v, s) for g, v, s in points if g.dataset == ds]
        if numeric:
            xs = [float(v) for v, _ in mine]
        else:  # categories side by side, datasets slightly apart so their dots do not hide
            offset = (i - (len(datasets) - 1) / 2) * 0.08
            xs = [categories.index(param_key(v)) + offset for v, _ in mine]
        ax.scatter(xs, [s for _, s in mine], color=color, alpha=0.6, s=22, label=ds)
        by_x: dict[float, list[float]] = defaultdict(list)
        for x, (_, s) in zip(xs, mine, strict=True):
            by_x[x].append(s)
        line_x = sorted(by_x)
        ax.plot(line_x, [statistics.fmean(by_x[x]) for x in line_x], color=color, lw=1.2)
    if log:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)),
                      [_display(json.loads(c)) for c in categories], rotation=20 if len(categories) > 4 else 0)
    ax.set_xlabel(param + (" (log scale)" if log else ""))
    ax.set_ylabel(f"validation {metric} (mean of folds)")
    ax.grid(alpha=0.3)
    if len(datasets) > 1:
        ax.legend(title="dataset", fontsize="small")
    return Figure(slug=f"metric_vs_{slug(param)}", title=f"{metric} against {param}",
                  caption=(f"Each dot is one group (dataset, point, seed): the mean validation {metric} "
                           f"of its finished folds; the line joins the means per value of {param}."),
                  png=_png(fig))


def _display(value: Any) -> str:
    return "(default)" if value is None else cell_text(value)


def _fold_scores(data: ReportData, metric: str) -> Figure | None:
    groups = [g for g in data.groups if g.fold_score(metric)]
    if not groups:
        return None
    higher = METRICS[metric]
    groups.sort(key=lambda g: (-(g.score(metric) or 0.0) if higher else (g.score(metric) or 0.0), g.name))
    cut = len(groups) > MAX_GROUPS_PLOTTED
    groups = groups[:MAX_GROUPS_PLOTTED]
    groups.reverse()  # best at the top
    fig = _new_figure(7.5, 1.2 + 0.28 * len(groups))
    ax = fig.add_subplot()
    scores = [g.fold_score(metric) for g in groups]
    ax.boxplot(scores, vert=False, widths=0.6, showfliers=False,
               medianprops={"color": "C1"}, boxprops={"color": "0.5"}, whiskerprops={"color": "0.5"})
    for i, values in enumerate(scores, start=1):
        ax.scatter(values, [i] * len(values), s=14, color="C0", alpha=0.7, zorder=3)
    labels = [f"{g.label} ({len(s)}/{len(g.folds)})" for g, s in zip(groups, scores, strict=True)]
    ax.set_yticks(range(1, len(groups) + 1), labels, fontsize="small")
    ax.set_xlabel(f"validation {metric} per fold")
    ax.grid(axis="x", alpha=0.3)
    note = f" Only the best {MAX_GROUPS_PLOTTED} groups are drawn." if cut else ""
    return Figure(slug="fold_scores", title="Per-fold scores per group",
                  caption=(f"One dot per finished fold, a box per group; (n/k) counts its finished "
                           f"folds. Best group at the top.{note}"),
                  png=_png(fig))


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _confusion(data: ReportData, metric: str) -> Figure | None:
    """Per dataset (at most MAX_CONFUSION), its best group's ensemble: holdout and OOF."""
    best: dict[str, GroupInfo] = {}
    for g in ranked(data, metric):
        if g.dataset not in best and g.ensemble["metrics.json"].is_file():
            best[g.dataset] = g
    rows_of_panels = []
    for g in list(best.values())[:MAX_CONFUSION]:
        panels = [(f"{g.label}\n{title}", rows) for title, name in
                  (("ensemble on the holdout", "holdout_predictions.csv"),
                   ("out-of-fold predictions", "oof_predictions.csv"))
                  if (rows := _read_csv(g.ensemble[name]))]
        if panels:
            classes = (read_json(g.ensemble["metrics.json"]) or {}).get("classes") or []
            labels = [str(c) for c in classes] or sorted({r["y_true"] for _, rows in panels for r in rows})
            rows_of_panels.append((labels, panels))
    if not rows_of_panels:
        return None
    n_cols = max(len(p) for _, p in rows_of_panels)
    size = max(4.0, 0.45 * max(len(labels) for labels, _ in rows_of_panels) + 2.5)
    fig = _new_figure(size * n_cols, size * len(rows_of_panels))
    for r, (labels, panels) in enumerate(rows_of_panels):
        for c, (title, rows) in enumerate(panels):
            _confusion_panel(fig.add_subplot(len(rows_of_panels), n_cols, r * n_cols + c + 1),
                             labels, rows, title)
    return Figure(slug="confusion_best", title="Confusion matrices of the best group of each dataset",
                  caption=("Counts of true (rows) against predicted (columns) classes, from the "
                           "ensemble folder of each dataset's best group in the table below."),
                  png=_png(fig))


def _confusion_panel(ax: Any, labels: list[str], rows: list[dict[str, str]], title: str) -> None:
    index = {c: j for j, c in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for row in rows:
        if row.get("y_true") in index and row.get("y_pred") in index:
            counts[index[row["y_true"]]][index[row["y_pred"]]] += 1
    ax.imshow(counts, cmap="Blues")
    top = max(max(c) for c in counts) or 1
    if len(labels) <= 20:
        for t in range(len(labels)):
            for p in range(len(labels)):
                ax.text(p, t, str(counts[t][p]), ha="center", va="center", fontsize="small",
                        color="white" if counts[t][p] > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 3 else 0, fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} ({len(rows)} rows)", fontsize="medium")


def worker_spans(data: ReportData) -> dict[str, list[tuple[float, float, str]]]:
    """worker -> (start, end, outcome) of each attempt it made, from the fold records'
    attempt history (else their last attempt's times); an attempt still going ends now,
    one that was lost (no end recorded) is left out."""
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for g in data.groups:
        for f in g.folds:
            attempts = f.attempts or [{"worker": f.worker, "started_at": f.started_at,
                                       "finished_at": f.finished_at, "outcome": f.state}]
            for i, a in enumerate(attempts):
                worker, start, end = a.get("worker"), as_number(a.get("started_at")), as_number(a.get("finished_at"))
                outcome = str(a.get("outcome") or f.state)
                if end is None and i == len(attempts) - 1 and f.state == Status.IN_PROGRESS.value:
                    end, outcome = data.generated_at, f.state
                if isinstance(worker, str) and worker and start is not None and end is not None and end >= start:
                    spans[worker].append((start, end, outcome))
    return {w: sorted(s) for w, s in sorted(spans.items())}


def worker_usage(spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Busy (the union of its runs), span (first start to last end), idle, longest gap."""
    busy, gap, cur_start, cur_end = 0.0, 0.0, spans[0][0], spans[0][1]
    for start, end, _ in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gap = max(gap, start - cur_end)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = max(e for _, e, _ in spans) - spans[0][0]
    return {"runs": len(spans), "busy": busy, "span": span, "idle": max(span - busy, 0.0),
            "longest_gap": gap}


STATE_COLORS = {DONE: "#4c9a5b", Status.FAILED.value: "#c8453c", "RETRY": "#e07b39",
                Status.IN_PROGRESS.value: "#e3a33b", Status.CANCELLED.value: "#8a8a8a"}


def _timeline(data: ReportData) -> Figure | None:
    spans = worker_spans(data)
    if not spans:
        return None
    t0 = min(s[0] for runs in spans.values() for s in runs)
    workers = list(spans)
    fig = _new_figure(9.0, 1.3 + 0.45 * len(workers))
    ax = fig.add_subplot()
    # A thin white edge tells runs apart, but on a bar narrower than it (runs of a few
    # milliseconds over minutes) the edge alone would show and look like idle time.
    visible = (max(e for runs in spans.values() for _, e, _ in runs) - t0) / 300
    for y, worker in enumerate(workers):
        by_state: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for start, end, state in spans[worker]:
            by_state[state].append((start - t0, max(end - start, 1e-3)))
        for state, bars in by_state.items():
            ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=STATE_COLORS.get(state, "#5470c6"),
                           edgecolors=["white" if w > visible else "none" for _, w in bars],
                           linewidth=0.4, label=state)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize="small", loc="upper right", ncols=len(unique))
    ax.set_yticks(range(len(workers)), workers, fontsize="small")
    ax.set_ylim(-0.6, len(workers) - 0.4 + 0.5)
    ax.set_xlabel("seconds since the first run started")
    ax.grid(axis="x", alpha=0.3)
    return Figure(slug="timeline", title="Runs per worker over time",
                  caption=("One bar per attempt of a run, from its start to its end as the run's "
                           "status file records them, coloured by outcome (RETRY: failed, then "
                           "retried); white space between bars is idle time."),
                  png=_png(fig))


# -- 3. HTML ---------------------------------------------------------------------------
