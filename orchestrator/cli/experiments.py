"""Commands that read experiments and results: validate, plan, status, logs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.box import HEAVY_HEAD
from rich.cells import cell_len
from rich.text import Span, Text

from .. import keys
from ..errors import OrchestratorError
from ..experiment.config import load_experiments
from ..experiment.expand import expand
from ..experiment.plan import plan_rows, totals
from ..experiment.spec import RunSpec
from ..paths import Layout, read_json
from ..views.overview import InFlight
from .base import cli, err, out, plans_of, results_root_option, results_root_path, use_broker

# Above this many characters, `--json` on a terminal is printed plain, not coloured:
# rich's JSON highlighter costs ~1.3 s a megabyte (status --json of 10,000 runs: 8.6 MB).
JSON_HIGHLIGHT_MAX = 1 << 20


def print_json(data: Any) -> None:
    """`data` as JSON indented by 2, as rich's print_json writes it; coloured only on a
    terminal and when small. Into a pipe rich would add nothing but its cost (status
    --json of 100,000 runs: 150 of its 204 s)."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    if out.is_terminal and len(text) <= JSON_HIGHLIGHT_MAX:
        out.print_json(text)
    else:
        out.file.write(text + "\n")
        out.file.flush()


def print_table(text: Text) -> None:
    """A table() on stdout: through rich on a terminal (colours), as it is into a pipe,
    where rich would add nothing but its cost (~25 us a line: 2.5 s for 100,000 runs)."""
    if out.is_terminal:
        out.print(text)
    else:
        out.file.write(text.plain + "\n")
        out.file.flush()


def _width(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


def table(headers: list[str], rows: list[list[str]], styles: list[str | None] | None = None,
          title: str | None = None, edge: bool = True) -> Text:
    """What rich's Table(headers, show_edge=edge, title=title) with overflow="fold"
    columns prints, at a fraction of its cost: rich measures and renders every cell
    through its segment pipeline, 0.3-0.6 ms a row (the 100,000 rows of `status` or
    `plan` of one big experiment: a minute); here a row that fits costs a few
    microseconds. The same box, padding and word wrapping (rich's, for the cells that
    need it); when the table is wider than the console the widest columns give way
    first, as in rich, though a column may end up a character wider or narrower than
    rich would make it. Cells are plain text (no markup); `styles`: one per row."""
    box = HEAVY_HEAD.substitute(out.options)
    widths = [max([1, _width(h), *(_width(part) for r in rows for part in r[i].split("\n"))])
              for i, h in enumerate(headers)]
    # Every column adds padding and a separator: 3 columns, plus one edge when drawn.
    room = max(len(widths), out.width - 3 * len(widths) + (-1 if edge else 1))
    while sum(widths) > room:  # the widest column gives way
        widths[widths.index(max(widths))] -= 1

    def line(cells: list[str], outer: str, inner: str) -> str:
        body = f" {inner} ".join(c + " " * (w - _width(c)) for c, w in zip(cells, widths, strict=True))
        return f"{outer} {body} {outer}" if edge else f" {body} "

    def rule(start: str, horizontal: str, cross: str, end: str) -> str:
        bars = cross.join(horizontal * (w + 2) for w in widths)
        return f"{start}{bars}{end}" if edge else bars

    lines: list[str] = []
    spans: list[Span] = []
    size = 0

    def add(text: str, style: str | None) -> None:
        nonlocal size
        if style:
            spans.append(Span(size, size + len(text), style))
        lines.append(text)
        size += len(text) + 1

    def add_row(cells: list[str], outer: str, inner: str, style: str | None) -> None:
        if all(_width(c) <= w and "\n" not in c for c, w in zip(cells, widths, strict=True)):
            add(line(cells, outer, inner), style)
            return
        folded = [[c] if _width(c) <= w and "\n" not in c
                  else [part.plain for part in Text(c).wrap(out, w, overflow="fold")] or [""]
                  for c, w in zip(cells, widths, strict=True)]
        for k in range(max(map(len, folded))):
            add(line([f[k] if k < len(f) else "" for f in folded], outer, inner), style)

    if title is not None:
        add(title, "table.title")
    if edge:
        add(rule(box.top_left, box.top, box.top_divider, box.top_right), None)
    add_row(headers, box.head_left, box.head_vertical, "table.header")
    add(rule(box.head_row_left, box.head_row_horizontal, box.head_row_cross, box.head_row_right), None)
    for n, row in enumerate(rows):
        add_row(row, box.mid_left, box.mid_vertical, styles[n] if styles else None)
    if edge:
        add(rule(box.bottom_left, box.bottom, box.bottom_divider, box.bottom_right), None)
    return Text("\n".join(lines), spans=spans, no_wrap=True, overflow="ignore")


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path())
def validate(configs: tuple[str, ...]) -> None:
    """Check experiment files and report every problem at once.

    \b
    Example:
      orchestrator validate configs/          # every *.yaml in the folder
    """
    from .roles import split_roles_configs, validate_roles

    others, roles_files = split_roles_configs(configs)
    if roles_files:  # `roles:` experiments (docs/roles.md)
        click.get_current_context().invoke(validate_roles, configs=tuple(roles_files))
        if not others:
            return
    for exp in load_experiments(list(others)):
        if exp.search is not None:
            cfg = exp.search
            per_trial = len(exp.datasets) * len(exp.seeds)
            out.print(f"OK  {exp.file}: experiment {exp.name!r}, a search ({cfg.strategy}) of {cfg.trials} "
                      f"trials, each {per_trial} group(s) of {exp.k or 1} run(s), {cfg.parallel} in flight",
                      markup=False)
            continue
        runs = expand(exp)
        n_groups = len({r.group_id for r in runs})
        out.print(f"OK  {exp.file}: experiment {exp.name!r}, {len(runs)} runs in {n_groups} groups",
                  markup=False)


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the schema to FILE instead of stdout.")
def schema(output: str | None) -> None:
    """Print a JSON Schema of the experiment YAML, for editors: the registered trainers'
    parameters included (ORCH_TRAINER_MODULES counts), built from what `validate` checks.
    What it cannot express (a CSV file that exists, enough samples for the folds) only
    `validate` reports.

    \b
    Example (VS Code's YAML extension, first line of a config):
      orchestrator schema -o experiment.schema.json
      # yaml-language-server: $schema=./experiment.schema.json
    """
    from ..experiment.schema import experiment_schema
    from ..trainers import registry

    text = json.dumps(experiment_schema(registry()), indent=2) + "\n"
    if output:
        from ..paths import atomic_write_text

        atomic_write_text(Path(output).resolve(), text)
        err.print(f"wrote {output}", markup=False)
    else:
        out.file.write(text)
        out.file.flush()


@cli.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path())
@results_root_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(configs: tuple[str, ...], results_root: str | None, as_json: bool) -> None:
    """Show the runs an experiment expands to, and which are already DONE.

    \b
    Example:
      orchestrator plan configs/iris_sweep.yaml --json | jq '.[0].totals'
    """
    layout = Layout(results_root_path(results_root))
    exps = load_experiments(list(configs))
    searches = [e for e in exps if e.search is not None]
    if searches:
        _plan_searches(layout, searches, as_json)
        exps = [e for e in exps if e.search is None]
        if not exps:
            return
    plans = plans_of(exps, layout)
    if as_json:
        data = [{"experiment": name, "totals": totals(p), "runs": plan_rows(layout, p),
                 "paused": read_json(layout.paused_marker(name))} for name, p in plans.items()]
        print_json(data)
        return
    for name, p in plans.items():
        rows = plan_rows(layout, p)
        styles = [{"DONE": "green", "FAILED": "red", "IN_PROGRESS": "yellow"}.get(r["state"]) for r in rows]
        print_table(table(["run", "run_id", "queue", "state"],
                          [[r["name"], r["run_id"], r["queue"], r["state"]] for r in rows], styles,
                          title=f"experiment {name}"))
        t = totals(p)
        out.print(f"{t['runs']} runs in {t['groups']} groups: {t['done']} DONE, {t['to_run']} to run, "
                  f"{t['groups_to_finalize']} groups to finalize")
        if read_json(layout.paused_marker(name)) is not None:
            out.print(f"{name} is PAUSED: its runs do not start until `orchestrator resume {name}`")



def _plan_searches(layout: Layout, searches: list[Any], as_json: bool) -> None:
    """A search's plan: its config, what it has done, and the proposals its next step
    would make (from its records and seed: the same ones the step will record)."""
    from ..search.client import search_plan

    data = [search_plan(layout, exp) for exp in searches]
    if as_json:
        print_json(data)
        return
    for d in data:
        cfg, st = d["search"], d["progress"]
        out.print(f"search {d['experiment']}: {cfg['strategy']} ({cfg['mode']}), "
                  f"{', '.join(f'{m} ({x})' for m, x in zip(cfg['metrics'], cfg['directions'], strict=True))}, "
                  f"{cfg['trials']} trials, {cfg['parallel']} in flight, seed {cfg['seed']}; each trial "
                  f"{d['groups_per_trial']} groups, {d['runs_per_trial']} runs", markup=False)
        out.print(f"so far: {st['proposed']} proposed, {st['complete']} complete, {st['failed']} failed, "
                  f"{st['pruned']} pruned, {st['running']} running" + (" (ended)" if st["finished"] else ""),
                  markup=False)
        rows = [[str(n["number"]), n["point"] or f"promote to {n['promote_to']} epochs"] for n in d["next"]]
        if rows:
            print_table(table(["trial", "next proposals"], rows, title=f"next step of {d['experiment']}"))


@cli.command()
@click.argument("experiment", required=False)
@results_root_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, with every output file's path.")
@click.option("--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
              help="Also ask this cluster's Redis about runs on workers without the results root "
              "(--return-results): running, failed, or RETURNED (outputs not yet written) [env ORCH_BROKER_URL].")
def status(experiment: str | None, results_root: str | None, as_json: bool, broker: str | None) -> None:
    """Per experiment and group: counts by state; per fold: worker, attempt, elapsed.

    \b
    Examples:
      orchestrator status
      orchestrator status iris_kfold --json | jq '.group_details[0].folds[0].files'
    """
    from ..dispatch.manifest import experiments
    from ..views.overview import experiment_status
    from .roles import is_roles_experiment, show_status

    if is_roles_experiment(results_root, experiment):  # its roles, from the cluster's Redis
        show_status(str(experiment), as_json, results_root, broker)
        return
    layout = Layout(results_root_path(results_root))
    names = [experiment] if experiment else experiments(layout)
    lookup = _in_flight(broker)
    data = [experiment_status(layout, n, with_files=as_json, in_flight=lookup) for n in names]
    _add_gangs(data, broker)
    if as_json:
        print_json(data if experiment is None else data[0])
        return
    if not names:
        out.print(f"no experiments under {layout.root}")
        return
    for st in data:
        paused = " [yellow]PAUSED[/]" if st["paused"] else ""
        out.print(f"[bold]{st['experiment']}[/]{paused}: groups {st['groups']}, runs {st['runs']}")
        if st.get("search"):
            from ..views.search import status_line

            out.print(status_line(st["experiment"], st["search"]), markup=False)
        if experiment is None:
            continue
        rows = []
        for g in st["group_details"]:
            for i, f in enumerate(g["folds"]):
                rows.append([g["name"] if i == 0 else "", g["state"] if i == 0 else "",
                             str(f["fold"]), f["state"], f["worker"] or "-", str(f["attempt"] or "-"),
                             f"{f['elapsed']:.1f}s" if f["elapsed"] is not None else "-", (f["error"] or "")[:60]])
                rows += _rank_rows(f)
        print_table(table(["group", "state", "fold", "run state", "worker", "attempt", "elapsed", "error"],
                          rows, edge=False))


def _add_gangs(data: list[dict[str, Any]], broker: str | None) -> None:
    """Each data-parallel fold's gang from the cluster's Redis (fold["gang"]), if reachable."""
    folds = [f for st in data for g in st["group_details"] for f in g["folds"] if f.get("ranks")]
    if not folds or not broker:
        return
    import redis as redis_lib

    from ..cluster.registry import state_url
    from ..execution.gang import gang_views

    try:
        views = gang_views(keys.client(state_url(broker), "command"), [f["run_key"] for f in folds])
    except redis_lib.RedisError:
        return
    for f in folds:
        if (view := views.get(f["run_key"])) is not None:
            f["gang"] = view


def _rank_rows(fold: dict[str, Any]) -> list[list[str]]:
    """The lines under a data-parallel fold: its gang's state, then one per rank."""
    gang = fold.get("gang")
    if fold.get("ranks") is None or gang is None or fold["state"] in ("DONE", "FAILED", "CANCELLED"):
        return []
    why = gang.get("why") if gang.get("state") == "waiting" else gang.get("abort")
    rows = [["", "", "", f"  gang {gang.get('state')}", f"{fold['ranks']} ranks", str(gang.get("attempt") or "-"),
             "", (why or "")[:60]]]
    now = time.time()
    for r in gang.get("ranks", []):
        beat = f"beat {now - float(r['beat']):.1f}s ago" if r.get("beat") else ""
        where = f"{r.get('host')}" + (f" GPU {r['gpu']}" if r.get("gpu") else "")
        rows.append(["", "", "", f"  rank {r.get('rank')}", str(r.get("worker")), str(r.get("attempt")),
                     f"step {r.get('step') if r.get('step') is not None else '-'}", f"{where} {beat}"])
    return rows



def _in_flight(broker: str | None) -> InFlight | None:
    """The lookup of return-mode folds in the cluster's Redis for `status`, or None
    without a broker. Redis unreachable: said once on stderr, the files alone count."""
    if not broker:
        return None
    import redis as redis_lib

    from ..cluster.registry import redact, state_url
    from ..execution.returns import Returns
    from .base import check_redis_url

    url = check_redis_url(state_url(broker), "broker URL (--broker / ORCH_BROKER_URL) or ORCH_STATE_URL")
    returns = Returns(keys.client(url, "command"))
    unreachable: list[str] = []

    def lookup(specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
        if unreachable:
            return {}
        try:
            return returns.records(specs)
        except redis_lib.RedisError as exc:
            unreachable.append(str(exc))
            err.print(f"note: cannot reach {redact(broker)} ({exc}); showing the status files only",
                      markup=False)
            return {}

    return lookup


@cli.command()
@click.argument("run")
@click.option("--attempt", type=int, default=None, help="Only this attempt (default: every attempt).")
@results_root_option
@click.option("--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
              help="Also look in this cluster's Redis, for runs trained on hosts without the shared results root.")
def logs(run: str, attempt: int | None, results_root: str | None, broker: str | None) -> None:
    """Show a run's stdout and stderr, attempt by attempt.

    RUN is a run name as `status` shows it (exp/dataset/point/seed=S/fold=F) or its
    run_id (a prefix of 6 or more characters will do).

    \b
    Example:
      orchestrator logs iris_kfold/iris/hidden=64,lr=0.01/seed=0/fold=2
    """

    from ..execution.runlogs import attempt_logs, find_run

    layout = Layout(results_root_path(results_root))
    spec = find_run(layout, run)
    client = None
    if broker:
        use_broker(broker, layout.root)
        client = keys.client(os.environ["ORCH_STATE_URL"], "command")
    found = attempt_logs(layout, spec, client)
    if attempt is not None:
        found = {k: v for k, v in found.items() if k == attempt}
    if not found:
        where = f"under {layout.logs_dir(spec)}" + (" or in Redis" if client is not None else "")
        raise OrchestratorError(f"no log of {spec.name}" + (f" attempt {attempt}" if attempt else "")
                                + f" {where}: it has not started yet, or ran elsewhere "
                                "(pass --broker to look in Redis)")
    for number, (source, data) in found.items():
        err.print(f"==> {spec.name} attempt {number} ({source}) <==", markup=False)
        sys.stdout.write(data.decode(errors="replace"))
        if data and not data.endswith(b"\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
