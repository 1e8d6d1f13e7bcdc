"""`orchestrator report`: one self-contained HTML file with PNG plots of an experiment.

Three plain steps: `collect` reads what the results root holds (manifest, fold and group
status files, final_results.csv, ensemble predictions) into a `ReportData`; `make_figures`
draws PNGs with matplotlib; `render_html` lays them out, each image embedded as a data URI
so the one file can be mailed or archived. `write_report` does all three and also saves
each PNG next to the HTML.

Nothing here assumes the experiment is finished: whatever is missing (a group not
finalized, a fold that failed or whose files are gone, no final_results.csv yet) is
listed in the report instead of stopping it. matplotlib is imported only when figures
are drawn, and only its object API with the Agg canvas is used (no pyplot, no global
backend switch), so other commands never pay for it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .manifest import load_manifest
from .paths import Layout, atomic_write_bytes, atomic_write_text, read_json
from .report import group_state
from .results import cell_text, read_final_results
from .spec import RunSpec
from .status import Status, fold_state, read_group_status

# metric -> True when higher is better (the fold metrics every run records).
METRICS = {"accuracy": True, "macro_f1": True, "log_loss": False}
MAX_GROUPS_PLOTTED = 40  # per-fold strip plot: beyond this only the best groups are drawn
MAX_CONFUSION = 6  # datasets whose best group gets confusion matrices
DONE = Status.DONE.value


@dataclass
class FoldInfo:
    fold: int
    run_id: str
    state: str  # fold_state(): DONE only when the outputs are intact; NEW when unknown
    worker: str | None
    started_at: float | None
    finished_at: float | None
    metrics: dict[str, float]
    error: str | None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the record's "history"
    recorded: str | None = None  # the status its record states (DONE even if files are gone)


@dataclass
class GroupInfo:
    name: str
    group_id: str
    label: str  # the name without the experiment: dataset/point/seed=N
    dataset: str
    seed: int
    params: dict[str, Any]  # as the YAML stated them
    state: str
    folds: list[FoldInfo]
    ensemble: dict[str, Path]
    rows: list[dict[str, str]] = field(default_factory=list)  # its final_results.csv rows
    status_metrics: dict[str, Any] = field(default_factory=dict)  # status.json oof/ensemble
    failed: dict[str, str] = field(default_factory=dict)

    def fold_score(self, metric: str) -> list[float]:
        return [f.metrics[metric] for f in self.folds
                if f.state == DONE and isinstance(f.metrics.get(metric), int | float)]

    def score(self, metric: str) -> float | None:
        """Mean over its DONE folds (for a finalized group, the mean of its CSV rows)."""
        values = self.fold_score(metric)
        return statistics.fmean(values) if values else None

    def csv_mean(self, column: str) -> float | None:
        values = [float(r[column]) for r in self.rows if r.get(column) not in (None, "")]
        return statistics.fmean(values) if values else None


@dataclass
class ReportData:
    experiment: str
    root: Path
    config: str | None
    submitted_at: float | None
    groups: list[GroupInfo]
    swept: list[str]  # parameters whose value differs between groups
    csv_path: Path
    csv_found: bool
    generated_at: float


@dataclass
class Figure:
    slug: str  # file name without .png
    title: str
    caption: str
    png: bytes


@dataclass
class ReportResult:
    html: Path
    images: list[Path]
    data: ReportData


# -- 1. collect ------------------------------------------------------------------------
def _param_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def collect(layout: Layout, experiment: str) -> ReportData:
    """Everything the report shows, read once from the results root. Raises
    ExperimentNotFound when the experiment has no manifest."""
    manifest = load_manifest(layout, experiment)
    rows_by_run: dict[str, dict[str, str]] = {}
    csv_found = layout.final_results(experiment).is_file()
    for row in read_final_results(layout, experiment):
        rows_by_run[row.get("run_id", "")] = row
    groups = []
    for g in manifest["groups"]:
        specs = [RunSpec.from_dict(r) for r in g["runs"]]
        first = specs[0]
        folds = []
        for spec in specs:
            state, record = fold_state(layout, spec)
            metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
            folds.append(FoldInfo(
                fold=spec.fold, run_id=spec.run_id, state=state, worker=record.get("worker"),
                started_at=_number(record.get("started_at")), finished_at=_number(record.get("finished_at")),
                metrics=metrics or {}, error=record.get("error") if state != DONE else None,
                attempts=[h for h in record.get("history") or [] if isinstance(h, dict)],
                recorded=record.get("status")))
        status = read_group_status(layout, first) or {}
        current = status.get("run_ids") == sorted(s.run_id for s in specs)
        groups.append(GroupInfo(
            name=g["name"], group_id=g["group_id"],
            label=f"{first.dataset.name}/{first.point}/seed={first.seed}",
            dataset=first.dataset.name, seed=first.seed, params=dict(first.params),
            state=group_state(layout, specs, [f.state for f in folds]), folds=folds,
            ensemble=layout.ensemble_files(first),
            rows=[rows_by_run[s.run_id] for s in specs if s.run_id in rows_by_run],
            status_metrics=status.get("metrics", {}) if current else {},
            failed=status.get("failed", {}) if current else {}))
    names = sorted({k for g in groups for k in g.params})
    swept = [n for n in names if len({_param_key(g.params.get(n)) for g in groups}) > 1]
    return ReportData(experiment=experiment, root=layout.root, config=manifest.get("config"),
                      submitted_at=_number(manifest.get("submitted_at")), groups=groups,
                      swept=swept, csv_path=layout.final_results(experiment),
                      csv_found=csv_found, generated_at=time.time())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def ranked(data: ReportData, metric: str) -> list[GroupInfo]:
    """Groups with rows in final_results.csv, best first by the mean of `metric` there."""
    scored = [g for g in data.groups if g.csv_mean(metric) is not None]
    sign = -1 if METRICS[metric] else 1
    return sorted(scored, key=lambda g: (sign * (g.csv_mean(metric) or 0.0), g.name))


def missing(data: ReportData) -> list[str]:
    """One line per thing that is not (or no longer) there."""
    lines = []
    if not data.csv_found:
        lines.append(f"{data.csv_path} does not exist yet: no group has been finalized")
    for g in data.groups:
        done = sum(f.state == DONE for f in g.folds)
        if g.state != DONE:
            lines.append(f"{g.name}: group {g.state}, {done}/{len(g.folds)} folds DONE")
        if "finalize" in g.failed:
            lines.append(f"{g.name}: finalize failed: {g.failed['finalize']}")
        for f in g.folds:
            if f.state == DONE:
                continue
            if f.state == "NEW" and f.recorded == DONE:
                lines.append(f"{g.name}: fold {f.fold}: outputs missing or changed since they were written")
            elif f.state == "NEW":
                lines.append(f"{g.name}: fold {f.fold}: no status record (not started)")
            else:
                why = f": {_shorten(f.error)}" if f.error else ""
                lines.append(f"{g.name}: fold {f.fold}: {f.state}{why}")
        if g.state == DONE:
            gone = [n for n, p in g.ensemble.items() if not p.is_file()]
            if gone:
                lines.append(f"{g.name}: ensemble files missing: {', '.join(gone)}")
            if len(g.rows) < len(g.folds) and data.csv_found:
                lines.append(f"{g.name}: {len(g.rows)}/{len(g.folds)} rows in final_results.csv")
    return lines


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _slug(text: str) -> str:
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
    categories = list(dict.fromkeys(_param_key(v) for _, v, _ in points))
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
            xs = [categories.index(_param_key(v)) + offset for v, _ in mine]
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
    return Figure(slug=f"metric_vs_{_slug(param)}", title=f"{metric} against {param}",
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
                worker, start, end = a.get("worker"), _number(a.get("started_at")), _number(a.get("finished_at"))
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
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 3px 9px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f5f5f5; } td { white-space: nowrap; }
.scroll { overflow-x: auto; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; } .missing li { color: #8a3a12; } code { background: #f3f3f3; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _num_cell(value: float | None, column: str, digits: int = 4) -> str:
    attr = "" if value is None else f' data-value="{_e(repr(value))}"'
    return f'<td class="num" data-col="{_e(column)}"{attr}>{_e(_fmt(value, digits))}</td>'


def _when(ts: float | None) -> str:
    return "–" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _best_table(data: ReportData, metric: str, top: int) -> str:
    groups = ranked(data, metric)[:top]
    if not groups:
        return "<p>No group has rows in final_results.csv yet.</p>"
    swept = data.swept
    head = ["#", "group", "state", *swept, "folds", f"{metric} mean", f"{metric} std",
            *[m for m in METRICS if m != metric], "holdout accuracy", "seconds (sum)",
            "oof accuracy", "ensemble accuracy"]
    out = ["<div class=\"scroll\"><table id=\"best\"><thead><tr>", *[f"<th>{_e(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for rank, g in enumerate(groups, start=1):
        values = [float(r[metric]) for r in g.rows if r.get(metric)]
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        cells = [f'<td class="num">{rank}</td>', f"<td>{_e(g.label)}</td>", f"<td>{_e(g.state)}</td>"]
        first = g.rows[0]
        cells += [f'<td data-col="param.{_e(p)}">{_e(first.get(f"param.{p}", ""))}</td>' for p in swept]
        cells.append(f'<td class="num" data-col="folds">{len(g.rows)}/{len(g.folds)}</td>')
        cells.append(_num_cell(g.csv_mean(metric), metric))
        cells.append(_num_cell(std, f"{metric}_std"))
        cells += [_num_cell(g.csv_mean(m), m) for m in METRICS if m != metric]
        cells.append(_num_cell(g.csv_mean("holdout_accuracy"), "holdout_accuracy"))
        seconds = [float(r["seconds"]) for r in g.rows if r.get("seconds")]
        cells.append(_num_cell(sum(seconds) if seconds else None, "seconds", 2))
        sm = g.status_metrics
        cells.append(_num_cell(_number(sm.get("oof", {}).get("accuracy")), "oof_accuracy"))
        cells.append(_num_cell(_number(sm.get("ensemble_holdout", {}).get("accuracy")), "ensemble_accuracy"))
        out.append(f'<tr data-group-id="{_e(g.group_id)}">{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return "".join(out)


def _workers_table(data: ReportData) -> str:
    spans = worker_spans(data)
    if not spans:
        return ""
    out = ['<table id="workers"><thead><tr>']
    out += [f"<th>{h}</th>" for h in ("worker", "runs", "busy s", "span s", "idle s", "idle %", "longest gap s")]
    out.append("</tr></thead><tbody>")
    for worker, runs in spans.items():
        u = worker_usage(runs)
        idle_pct = 100 * u["idle"] / u["span"] if u["span"] > 0 else 0.0
        out.append(f"<tr><td>{_e(worker)}</td><td class=\"num\">{int(u['runs'])}</td>"
                   + "".join(f'<td class="num">{v:.1f}</td>' for v in
                             (u["busy"], u["span"], u["idle"], idle_pct, u["longest_gap"]))
                   + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(data: ReportData, figures: list[Figure], metric: str = "accuracy", top: int = 10,
                files_dir: str | None = None) -> str:
    """The report page; every value that comes from the results is escaped."""
    figs = {f.slug: f for f in figures}
    groups = Counter(g.state for g in data.groups)
    runs = Counter(f.state for g in data.groups for f in g.folds)
    n_runs = sum(runs.values())

    def figure(slug: str) -> str:
        f = figs.get(slug)
        if f is None:
            return ""
        src = "data:image/png;base64," + base64.b64encode(f.png).decode()
        link = (f' (<a href="{_e(quote(files_dir + "/" + slug + ".png"))}">{_e(slug)}.png</a>)'
                if files_dir else "")
        return (f'<figure id="fig-{_e(slug)}"><img src="{src}" alt="{_e(f.title)}">'
                f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)}{link}</figcaption></figure>")

    gaps = missing(data)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(data.experiment)}: experiment report</title><style>{CSS}</style></head><body>",
        f"<h1>Experiment {_e(data.experiment)}</h1>",
        "<table id=\"summary\">",
        f"<tr><th>groups</th><td>{groups.get(DONE, 0)}/{len(data.groups)} DONE "
        f"({_e(', '.join(f'{k} {v}' for k, v in sorted(groups.items())))})</td></tr>",
        f"<tr><th>runs</th><td>{runs.get(DONE, 0)}/{n_runs} DONE "
        f"({_e(', '.join(f'{k} {v}' for k, v in sorted(runs.items())))})</td></tr>",
        f"<tr><th>config</th><td><code>{_e(data.config or '–')}</code></td></tr>",
        f"<tr><th>results</th><td><code>{_e(data.csv_path)}</code></td></tr>",
        f"<tr><th>submitted</th><td>{_e(_when(data.submitted_at))}</td></tr>",
        f"<tr><th>report made</th><td>{_e(_when(data.generated_at))}</td></tr>",
        f"<tr><th>swept</th><td>{_e(', '.join(data.swept) or 'nothing (one point)')}</td></tr>",
        "</table>",
    ]
    if gaps:
        parts.append(f'<h2 id="missing">Not finished or missing ({len(gaps)})</h2><ul class="missing">')
        parts += [f"<li>{_e(line)}</li>" for line in gaps]
        parts.append("</ul>")
    parts.append(f"<h2 id=\"best-points\">Best groups by validation {_e(metric)}</h2>")
    parts.append(f"<p>The top {top} groups. Every value is the mean over the group's rows in "
                 f"<code>final_results.csv</code> (one row per fold), except the last two columns, "
                 "which come from the group's <code>status/status.json</code>: the accuracy of the "
                 "out-of-fold predictions and of the fold ensemble on the holdout.</p>")
    parts.append(_best_table(data, metric, top))
    parts.append(f"<h2 id=\"params\">Validation {_e(metric)} against each swept parameter</h2>")
    if not data.swept:
        parts.append("<p>No parameter varies between the groups.</p>")
    for param in data.swept:
        parts.append(figure(f"metric_vs_{_slug(param)}") or
                     f"<p>{_e(param)}: no finished fold to plot yet.</p>")
    parts.append("<h2 id=\"folds\">Per-fold scores</h2>")
    parts.append(figure("fold_scores") or "<p>No finished fold yet.</p>")
    parts.append("<h2 id=\"confusion\">Confusion matrices</h2>")
    parts.append(figure("confusion_best") or "<p>No finalized group with ensemble predictions yet.</p>")
    parts.append("<h2 id=\"timeline\">Worker timeline</h2>")
    parts.append(figure("timeline") or "<p>No run has started yet.</p>")
    parts.append(_workers_table(data))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


# -- all three -------------------------------------------------------------------------
def default_output(layout: Layout, experiment: str) -> Path:
    return layout.experiment_dir(experiment) / "report.html"


def write_report(layout: Layout, experiment: str, output: Path | None = None,
                 metric: str = "accuracy", top: int = 10) -> ReportResult:
    """Write the HTML (and each PNG into `<stem>_files/` next to it), atomically."""
    data = collect(layout, experiment)
    figures = make_figures(data, metric)
    path = (output or default_output(layout, experiment)).resolve()
    files_dir = path.parent / f"{path.stem}_files"
    images = []
    for f in figures:
        image = files_dir / f"{f.slug}.png"
        atomic_write_bytes(image, f.png)
        images.append(image)
    for stale in files_dir.glob("*.png") if files_dir.is_dir() else []:
        if stale not in images:  # a plot the previous report had (a parameter no longer swept)
            stale.unlink(missing_ok=True)
    atomic_write_text(path, render_html(data, figures, metric, top, files_dir.name))
    return ReportResult(html=path, images=images, data=data)
