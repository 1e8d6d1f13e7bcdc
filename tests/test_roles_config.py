"""The `roles:` form of an experiment: validation (exit 2, the key, what is valid),
role messages refused whole, device overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import ConfigError, InvalidSpecError
from orchestrator.roles.config import parse_roles
from orchestrator.roles.registry import UnknownRoleError
from orchestrator.roles.spec import RoleSpec, specs_of

from .conftest import REPO, run_cli

GOOD: dict[str, Any] = {
    "experiment": "ttt",
    "roles": {"learner": {"function": "tictactoe.learner", "settings": {"steps": 50}},
              "actor": {"function": "tictactoe.actor", "count": 2, "cpu": {"games": 8}, "cuda": {"games": 64}},
              "evaluator": {"function": "tictactoe.evaluator"}},
    "weights": {"keep": 2}, "experience": {"maxlen": 2000},
}


def _problems(doc: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_roles(doc, "x.yaml")
    return {p.key: p.message for p in info.value.problems}


def test_the_example_config_is_valid() -> None:
    from orchestrator.roles.config import load_roles

    exp = load_roles(REPO / "configs" / "roles" / "tictactoe.yaml")
    assert exp.learner.function == "tictactoe.learner" and sum(r.count for r in exp.roles) == 4
    proc = run_cli("roles", "validate", str(REPO / "configs" / "roles" / "tictactoe.yaml"))
    assert proc.returncode == 0 and "4 role instances" in proc.stdout, proc.stdout + proc.stderr


def test_specs_with_device_overrides_round_trip() -> None:
    exp = parse_roles(GOOD)
    specs = specs_of(exp, 123.0)
    assert [s.role for s in specs] == ["learner", "actor", "actor", "evaluator"]
    actor = specs[1]
    assert RoleSpec.from_dict(actor.to_dict()) == actor
    assert actor.settings_for("cpu")["games"] == 8 and actor.settings_for("cuda")["games"] == 64
    assert actor.settings_for("cpu")["epsilon"] == 0.2  # the function's default
    assert actor.queue == "cpu"
    assert {s.unscored for s in specs} == {4}  # versions held for the evaluator (the default)
    alone = parse_roles({**GOOD, "roles": {k: v for k, v in GOOD["roles"].items() if k != "evaluator"}})
    assert {s.unscored for s in specs_of(alone, 1.0)} == {0}  # no evaluator: nothing is held


@pytest.mark.parametrize("change, key, words", [
    ({"roles": {"learner": {"function": "tictactoe.lerner"}}}, "roles.learner.function", "did you mean"),
    ({"roles": {**GOOD["roles"], "actor": {"function": "tictactoe.actor", "count": 0}}}, "roles.actor.count", "from 1 to 64"),
    ({"roles": {**GOOD["roles"], "actor": {"function": "tictactoe.actor", "settings": {"epsilon": 2}}}},
     "roles.actor.settings.epsilon", "<= 1.0"),
    ({"roles": {**GOOD["roles"], "actor": {"function": "tictactoe.actor", "settings": {"gams": 2}}}},
     "roles.actor.settings.gams", "valid: games, epsilon"),
    ({"roles": {"actor": {"function": "tictactoe.actor"}}}, "roles", "exactly one learner"),
    ({"roles": {**GOOD["roles"], "learner": {"function": "tictactoe.learner", "count": 2}}}, "roles.learner.count", "one instance"),
    ({"roles": {**GOOD["roles"], "actor": {"function": "tictactoe.actor", "resources": {"gpus": 2}}}},
     "roles.actor.resources.gpus", "share of one GPU"),
    ({"roles": {**GOOD["roles"], "actor": {"function": "tictactoe.actor", "cuda": {"epsilon": "x"}}}},
     "roles.actor.cuda.epsilon", "must be a number"),
    ({"experience": {"maxlen": 10}}, "experience.maxlen", "from 100"),
    ({"weights": {"chunk_mb": 1024}}, "weights.chunk_mb", "512 MB"),
    ({"weights": {"unscored": 0}}, "weights.unscored", "until an evaluator scores them"),
    ({"sweep": {"grid": {}}}, "sweep", "a roles experiment takes"),
    ({"roles": {"bad/name": {"function": "tictactoe.actor"}}}, "roles.bad/name", "not a valid name"),
    ({"roles": {**GOOD["roles"], "actor": {"function": "tictactoe.actor", "settings": {"games": 500}}},
      "experience": {"maxlen": 1000}}, "roles.actor.settings.games", "cannot fit experience.maxlen"),
])
def test_a_mistake_names_its_key_and_what_is_valid(change: dict[str, Any], key: str, words: str) -> None:
    problems = _problems({**GOOD, **change})
    assert key in problems, problems
    assert words in problems[key], problems[key]


def test_every_mistake_is_reported_at_once_with_exit_2(tmp_path: Path) -> None:
    doc = {"experiment": "bad name", "roles": {
        "learner": {"function": "tictactoe.learner", "settings": {"steps": -1}},
        "actor": {"function": "nope", "count": "two"}, "evaluator": {"function": "tictactoe.evaluator", "colour": 1}},
        "weights": {"keep": 0}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for key in ("experiment", "roles.learner.settings.steps", "roles.actor.function", "roles.actor.count",
                "roles.evaluator.colour", "weights.keep"):
        assert f"{key}:" in proc.stderr, (key, proc.stderr)


@pytest.mark.parametrize("field, value", [
    ("function", "os.system"), ("experiment", "../etc"), ("role", "a/b"), ("index", 5), ("kind", "actor"),
    ("settings", {"steps": "many"}), ("overrides", {"rocm": {}}), ("gpus", 3), ("extra", 1),
    ("unscored", -1), ("unscored", 10_000), ("unscored", True),
])
def test_a_forged_role_message_is_refused(field: str, value: Any) -> None:
    good = specs_of(parse_roles(GOOD), 1.0)[0].to_dict()
    with pytest.raises((InvalidSpecError, UnknownRoleError)):
        RoleSpec.from_dict({**good, field: value})


def test_status_plots_the_scores_per_version() -> None:
    """`status` and `watch` draw the evaluators' scores per version in one line: every
    version a character (their mean when more than 60), from 0.5 (or the lowest) to 1."""
    from orchestrator.views.roles import SPARKS, score_plot

    few = score_plot([{"version": v, "win_random": 0.5 + v / 10, "draw_random": 0.0} for v in range(1, 6)])
    assert few.endswith(f": {SPARKS[1]}{SPARKS[3]}{SPARKS[4]}{SPARKS[6]}{SPARKS[7]} 1.00"), few
    many = score_plot([{"version": v, "win_random": 0.2, "draw_random": 0.1} for v in range(1, 301)])
    assert "versions 1..300 (0.3 to 1, 5 a character)" in many and many.count(SPARKS[0]) == 60, many
