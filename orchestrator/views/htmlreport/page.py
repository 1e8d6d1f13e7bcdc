"""The report's page: HTML with the figures inlined, written atomically under the results root."""

from __future__ import annotations

import base64
import html
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ...paths import Layout, atomic_write_bytes, atomic_write_text
from .data import (
    DONE,
    METRICS,
    Figure,
    ReportData,
    ReportResult,
    as_number,
    collect,
    missing,
    ranked,
)
from .figures import make_figures, slug, worker_spans, worker_usage

# metric -> True when higher is better (the fold metrics every run records).

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
        cells.append(_num_cell(as_number(sm.get("oof", {}).get("accuracy")), "oof_accuracy"))
        cells.append(_num_cell(as_number(sm.get("ensemble_holdout", {}).get("accuracy")), "ensemble_accuracy"))
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
                files_dir: str | None = None, layout: Layout | None = None) -> str:
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
    if layout is not None:  # a search: its trials, best so far, scores by parameter
        from .searchfigs import search_html

        parts.append(search_html(layout, data.experiment, figure))
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
        parts.append(figure(f"metric_vs_{slug(param)}") or
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
    if layout.search_config(experiment).exists():
        from .searchfigs import search_figures

        figures += search_figures(layout, experiment)
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
    atomic_write_text(path, render_html(data, figures, metric, top, files_dir.name, layout))
    return ReportResult(html=path, images=images, data=data)
