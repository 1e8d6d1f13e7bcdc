"""The report's search section: best so far against trials, the score against each
searched parameter, and per-generation scores for `evolution` (from the journal)."""

from __future__ import annotations

import html
import math
from typing import Any

from ...paths import Layout
from ...search.engine import Search, best_trials, load_search, progress, read_history
from ...search.journal import COMPLETE, Trial
from .data import Figure


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(7.5, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _scored(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.values and t.state in (COMPLETE, "PRUNED")]


def search_figures(layout: Layout, experiment: str) -> list[Figure]:
    search = load_search(layout, experiment)
    if search is None:
        return []
    trials = read_history(layout, experiment).ordered
    scored = _scored(trials)
    if not scored:
        return []
    metric, direction = search.cfg.metrics[0], search.cfg.directions[0]
    out = [_best_so_far(trials, metric, direction)]
    for name in search.cfg.names:
        out.append(_against(scored, metric, name))
    if search.cfg.strategy == "evolution":
        out.append(_generations(scored, metric))
    return out


def _best_so_far(trials: list[Trial], metric: str, direction: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    best, xs, ys, bx, by = None, [], [], [], []
    better = max if direction == "maximize" else min
    for t in trials:
        if t.values and t.state == COMPLETE:
            xs.append(t.number)
            ys.append(t.values[0])
            best = t.values[0] if best is None else better(best, t.values[0])
        if best is not None:
            bx.append(t.number)
            by.append(best)
    ax.scatter(xs, ys, s=12, alpha=0.6, label="trial")
    ax.step(bx, by, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend(loc="best")
    return Figure("search_best_so_far", "Best so far against trials",
                  f"Each complete trial's {metric} (dots) and the best up to it ({direction}).", _png(fig))


def _numeric(name: str, value: Any) -> tuple[float, str]:
    """(x, label) of a parameter value: numbers as they are, a list of widths by its
    layer count, anything else by its text (placed by first appearance)."""
    if isinstance(value, bool):
        return float(value), str(value)
    if isinstance(value, int | float):
        return float(value), f"{value:g}"
    if isinstance(value, list):
        return float(len(value)), str(len(value))
    return math.nan, str(value)


def _against(scored: list[Trial], metric: str, name: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    points = [(_numeric(name, t.params.get(name)), t.values[0]) for t in scored if t.values]
    categories: list[str] = []
    xs = []
    for (x, label), _ in points:
        if math.isnan(x):
            if label not in categories:
                categories.append(label)
            x = float(categories.index(label))
        xs.append(x)
    ax.scatter(xs, [v for _, v in points], s=14, alpha=0.7)
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(f"{name} (layers)" if name == "hidden" else name)
    ax.set_ylabel(metric)
    return Figure(f"search_vs_{name}", f"{metric} against {name}",
                  f"Each scored trial's {metric} against its {name}.", _png(fig))


def _generations(scored: list[Trial], metric: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    gens = sorted({t.generation for t in scored})
    data = [[t.values[0] for t in scored if t.generation == g and t.values] for g in gens]
    ax.boxplot(data, positions=gens)
    ax.plot(gens, [max(d) for d in data], marker="o", color="C3", label="best of the generation")
    ax.set_xlabel("generation")
    ax.set_ylabel(metric)
    ax.legend(loc="best")
    return Figure("search_generations", "Scores per generation",
                  f"The {metric} of each generation's new trials (boxes) and its best (line).", _png(fig))


def search_html(layout: Layout, experiment: str, figure: Any) -> str:
    """The search section of the page ('' for an experiment that is not a search);
    `figure(slug)` renders one of search_figures."""
    search: Search | None = load_search(layout, experiment)
    if search is None:
        return ""
    h = read_history(layout, experiment)
    st = progress(search, h)
    e = html.escape
    rows = "".join(
        f"<tr><td>{t.number}</td><td>{t.generation}</td><td class=\"num\">{(t.values or [math.nan])[0]:.4f}</td>"
        f"<td><code>{e(', '.join(f'{k}={v}' for k, v in t.params.items()))}</code></td></tr>"
        for t in best_trials(search, h, 10))
    parts = [
        '<h2 id="search">Search</h2>',
        f"<p>{e(search.cfg.strategy)} on {e(', '.join(search.cfg.metrics))} "
        f"({e(', '.join(search.cfg.directions))}): {st['complete']} complete, {st['failed']} failed, "
        f"{st['pruned']} pruned, {st['running']} running of {st['trials']} trials"
        f"{' (ended)' if st['finished'] else ''}.</p>",
        '<table id="search-best"><tr><th>trial</th><th>gen</th><th>score</th><th>params</th></tr>'
        + rows + "</table>",
        figure("search_best_so_far"),
        *(figure(f"search_vs_{n}") for n in search.cfg.names),
        figure("search_generations"),
    ]
    return "\n".join(p for p in parts if p)
