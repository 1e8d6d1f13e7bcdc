"""What `orchestrator roles status|watch|report` show of a roles experiment: its role
instances (host, state, heartbeat, attempt), the current weight version, throughput
(games and samples per second of the actors, steps per second of the learner), the
experience stream, and the evaluators' scores per version (a plot in `report`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, cast

import redis

from .. import keys
from ..dispatch.manifest import load_manifest
from ..execution.leases import lease_seconds
from ..paths import Layout
from ..roles import rkeys
from ..roles.experience import ExperienceStream
from ..roles.files import RolesFiles
from ..roles.instance import evaluations
from ..roles.weights import WeightStore


def roles_status(client: redis.Redis, layout: Layout, experiment: str) -> dict[str, Any]:
    manifest = load_manifest(layout, experiment)
    specs = manifest.get("roles") or []
    beats = {k.decode(): json.loads(v) for k, v in
             cast(dict[bytes, bytes], client.hgetall(rkeys.beats(experiment))).items()}
    now, stale = time.time(), 3 * lease_seconds()
    instances = []
    for spec in specs:
        ikey = rkeys.instance_key(experiment, spec["role"], spec["index"])
        beat = beats.get(ikey, {})
        held = bool(client.exists(keys.lease(ikey)))
        age = now - float(beat.get("at", 0)) if beat else None
        state = beat.get("state", "queued")
        if state not in ("stopped", "failed") and not held and beat:
            state = "lost" if age is not None and age > stale else state
        instances.append({"instance": f"{spec['role']}.{spec['index']}", "kind": spec["kind"],
                          "function": spec["function"], "host": beat.get("host"), "worker": beat.get("worker"),
                          "state": state, "attempt": beat.get("attempt"), "lease": held,
                          "heartbeat_age_s": None if age is None else round(age, 1),
                          **{k: v for k, v in beat.items() if k.endswith("_per_s") or k in (
                              "games", "samples", "steps", "evaluated", "version", "behind")}})
    store = WeightStore(client, experiment)
    kept = store.versions()
    latest = store.latest()
    meta = store.meta(latest) if latest is not None else None
    raw_state = {k.decode(): v.decode() for k, v in
                 cast(dict[bytes, bytes], client.hgetall(rkeys.state(experiment))).items()}
    stream = ExperienceStream(client, experiment)
    scored = evaluations(client, experiment)
    evals = [scored[v] for v in sorted(scored)]
    actors = [i for i in instances if i["kind"] == "actor" and i["state"] in ("running", "waiting: stream full")]
    learner = next((i for i in instances if i["kind"] == "learner"), {})
    best = store.best()
    return {
        "experiment": experiment, "status": (RolesFiles(layout, experiment).status() or {}).get("state"),
        "ended": raw_state.get("ended"), "paused": bool(client.exists(keys.paused(experiment))),
        "instances": instances,
        "weights": {"version": latest, "step": meta.get("step") if meta else None, "kept": kept,
                    "best": None if best is None else {"version": best[0], "score": best[1]},
                    "unscored": store.unscored()},
        "throughput": {"games_per_s": round(sum(float(i.get("games_per_s") or 0) for i in actors), 1),
                       "samples_per_s": round(sum(float(i.get("samples_per_s") or 0) for i in actors), 1),
                       "learner_steps_per_s": learner.get("steps_per_s")},
        "experience": {"length": stream.length() if client.exists(stream.key) else 0,
                       "pending": stream.pending()},
        "evaluations": evals,
    }


def status_lines(data: dict[str, Any]) -> list[str]:
    """The status screen as text lines (also what `watch` redraws)."""
    w, t, x = data["weights"], data["throughput"], data["experience"]
    head = (f"{data['experiment']}: {data.get('status') or '?'}"
            + (f" (ended: {data['ended']})" if data.get("ended") else "")
            + (" PAUSED" if data.get("paused") else ""))
    lines = [head,
             f"weights: version {w['version']} (step {w['step']}), kept {w['kept']}, best {w['best']}"
             + (f", not scored yet {w['unscored']}" if w.get("unscored") else ""),
             f"throughput: {t['games_per_s']} games/s, {t['samples_per_s']} samples/s from actors; "
             f"learner {t['learner_steps_per_s']} steps/s",
             f"experience stream: {x['length']} entries, {x['pending']} read and not yet acknowledged",
             "",
             f"{'instance':<14} {'kind':<10} {'state':<22} {'host':<14} {'attempt':>7} {'beat s':>7}  rates"]
    for i in data["instances"]:
        rates = ", ".join(f"{k} {v}" for k, v in i.items() if k.endswith("_per_s") or k == "behind")
        lines.append(f"{i['instance']:<14} {i['kind']:<10} {i['state']:<22} {str(i['host'] or '-'):<14} "
                     f"{str(i['attempt'] or '-'):>7} {str(i['heartbeat_age_s'] if i['heartbeat_age_s'] is not None else '-'):>7}  {rates}")
    if data["evaluations"]:
        lines += ["", score_plot(data["evaluations"])]
        lines += ["", f"{'version':>7} {'step':>6} {'win/random':>10} {'draw/random':>11} {'win+draw':>8} {'win/best':>8}"]
        for e in data["evaluations"][-15:]:
            wd = float(e.get("win_random", 0)) + float(e.get("draw_random", 0))
            wb = e.get("win_best")
            lines.append(f"{e['version']:>7} {e.get('step', ''):>6} {e.get('win_random', 0):>10.2f} "
                         f"{e.get('draw_random', 0):>11.2f} {wd:>8.2f} {'-' if wb in (None, '') else f'{float(wb):.2f}':>8}")
    return lines


SPARKS = "▁▂▃▄▅▆▇█"


def score_plot(evals: list[dict[str, Any]], width: int = 60) -> str:
    """The evaluators' scores per version as a one-line plot for the terminal (`status`,
    `watch`): win or draw against a random player, from 0.5 (or lower, to the lowest
    score) to 1, every version (several per character, their mean, beyond `width`)."""
    values = [float(e.get("win_random", 0)) + float(e.get("draw_random", 0)) for e in evals]
    low = min(0.5, math.floor(min(values) * 10) / 10)  # the rates that matter fill the height
    per = -(-len(values) // width)
    cells = [values[i:i + per] for i in range(0, len(values), per)]
    line = "".join(SPARKS[max(0, min(len(SPARKS) - 1, int((sum(c) / len(c) - low) / (1 - low) * len(SPARKS))))]
                   for c in cells)
    return (f"win or draw vs random, versions {evals[0]['version']}..{evals[-1]['version']} "
            f"({low:g} to 1{f', {per} a character' if per > 1 else ''}): {line} {values[-1]:.2f}")


def plot_scores(data: dict[str, Any], path: Path) -> Path | None:
    """The evaluators' win and draw rates per version, as a PNG; None without evaluations."""
    evals = data["evaluations"]
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(e.get("step", e["version"])) for e in evals]
    win = [float(e.get("win_random", 0)) for e in evals]
    draw = [float(e.get("draw_random", 0)) for e in evals]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [a + b for a, b in zip(win, draw, strict=True)], marker="o", label="win or draw vs random")
    ax.plot(steps, win, marker=".", label="win vs random")
    best = [(int(e.get("step", 0)), float(e["win_best"]) + float(e.get("draw_best") or 0))
            for e in evals if e.get("win_best") not in (None, "")]
    if best:
        ax.plot([b[0] for b in best], [b[1] for b in best], marker="x", label="win or draw vs best so far")
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("learner step of the version")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{data['experiment']}: evaluator's scores per version")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
