"""The `roles:` form of an experiment YAML, validated once (every problem at once, each
with file, key path and what would be valid; the CLI exits 2):

    experiment: ttt_selfplay
    roles:
      learner:   {function: tictactoe.learner, count: 1, settings: {steps: 400, publish_every: 20}}
      actor:     {function: tictactoe.actor, count: 2, settings: {games: 32}, cpu: {games: 16}}
      evaluator: {function: tictactoe.evaluator, count: 1, resources: {gpus: 0}}
    weights: {keep: 3, chunk_mb: 8, unscored: 4}
    experience: {maxlen: 20000}

Exactly one role is a learner with count 1 (its step budget ends the experiment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, Problem
from ..experiment.names import NAME_RE, NAME_RULE, did_you_mean
from ..experiment.spec import gpus_problem
from .registry import Role, UnknownRoleError, get_role, registry

TOP_KEYS = {
    "experiment": "experiment name (required)",
    "description": "free text",
    "roles": "mapping role name -> {function, count, resources, settings, cuda, cpu} (required)",
    "weights": "{keep: versions kept besides the best (default 3), chunk_mb: chunk size in MiB (default 8), "
               "unscored: versions held until an evaluator scores them, at most (default 4)}",
    "experience": "{maxlen: most samples the stream holds (default 50000)}",
    "seed": "integer seed of every role (default 0)",
}
ROLE_KEYS = ("function", "count", "resources", "settings", "cuda", "cpu")
COUNT_MAX = 64
UNSCORED_MAX = 1000
WEIGHT_KEYS = ("keep", "chunk_mb", "unscored")
DEVICES = ("cuda", "cpu")  # per-device settings that replace `settings`


@dataclass(frozen=True)
class RoleConfig:
    name: str  # the role's name in the YAML, e.g. "actor"
    function: str  # registered role function
    kind: str
    count: int
    gpus: float
    settings: dict[str, Any]
    overrides: dict[str, dict[str, Any]]  # device -> settings replacing `settings`


@dataclass(frozen=True)
class RolesExperiment:
    name: str
    file: str
    roles: tuple[RoleConfig, ...]
    keep: int
    chunk_mb: int
    maxlen: int
    seed: int
    unscored: int = 4  # versions held in Redis until an evaluator scores them, at most

    @property
    def learner(self) -> RoleConfig:
        return next(r for r in self.roles if r.kind == "learner")


def is_roles_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and "roles" in doc


def is_roles_file(path: str | Path) -> bool:
    """Whether a YAML file declares `roles:` (an unreadable one is left to the usual loader)."""
    try:
        return is_roles_doc(yaml.safe_load(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def load_roles(path: str | Path) -> RolesExperiment:
    file = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError([Problem(file, "", f"cannot read YAML: {exc}")]) from None
    return parse_roles(doc, file)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_roles(doc: Any, file: str = "<dict>") -> RolesExperiment:
    problems: list[Problem] = []

    def bad(key: str, message: str) -> None:
        problems.append(Problem(file, key, message))

    if not isinstance(doc, dict):
        raise ConfigError([Problem(file, "", "must be a YAML mapping with 'experiment' and 'roles'")])
    for key in doc:
        if key not in TOP_KEYS:
            bad(str(key), f"unknown key{did_you_mean(str(key), list(TOP_KEYS))}; a roles experiment "
                          f"takes: {', '.join(TOP_KEYS)}")
    name = doc.get("experiment")
    if not isinstance(name, str) or not NAME_RE.match(name):
        bad("experiment", f"{name!r} is not a valid name ({NAME_RULE})" if "experiment" in doc
            else "required key is missing (a name like 'ttt_selfplay')")
    roles = _roles(doc.get("roles"), bad)
    keep, chunk_mb, unscored = _weights(doc.get("weights", {}), bad)
    maxlen = _experience(doc.get("experience", {}), bad)
    seed = doc.get("seed", 0)
    if not _int(seed) or seed < 0:
        bad("seed", f"must be a non-negative integer, got {seed!r}")
        seed = 0
    for role in roles:
        batch = role.settings.get("games")
        if role.kind == "actor" and isinstance(batch, int) and batch * 9 > maxlen:
            bad(f"roles.{role.name}.settings.games", f"a batch of {batch} games (up to {batch * 9} samples) "
                                                     f"cannot fit experience.maxlen {maxlen}")
    if problems:
        raise ConfigError(problems)
    return RolesExperiment(name=str(name), file=file, roles=tuple(roles), keep=keep, chunk_mb=chunk_mb,
                           maxlen=maxlen, seed=int(seed), unscored=unscored)


def _roles(value: Any, bad: Any) -> list[RoleConfig]:
    if not isinstance(value, dict) or not value:
        bad("roles", "must be a mapping of role names to {function, count, settings, ...}, e.g. "
                     "{learner: {function: tictactoe.learner}, actor: {function: tictactoe.actor, count: 2}}")
        return []
    out: list[RoleConfig] = []
    for rname, body in value.items():
        key = f"roles.{rname}"
        if not isinstance(rname, str) or not NAME_RE.match(rname):
            bad(key, f"role name {rname!r} is not a valid name ({NAME_RULE})")
            continue
        if not isinstance(body, dict):
            bad(key, "must be a mapping {function, count, resources, settings, cuda, cpu}")
            continue
        for k in body:
            if k not in ROLE_KEYS:
                bad(f"{key}.{k}", f"unknown key{did_you_mean(str(k), list(ROLE_KEYS))}; valid: {', '.join(ROLE_KEYS)}")
        role = _function(key, body.get("function"), bad)
        count = body.get("count", 1)
        if not _int(count) or not 1 <= count <= COUNT_MAX:
            bad(f"{key}.count", f"must be an integer from 1 to {COUNT_MAX}, got {count!r}")
            count = 1
        gpus = _resources(key, body.get("resources", {}), bad)
        settings = _settings(f"{key}.settings", body.get("settings", {}), role, bad)
        overrides = {d: _settings(f"{key}.{d}", body[d], role, bad) for d in DEVICES if d in body}
        if role is None:
            continue
        if role.kind == "learner" and count != 1:
            bad(f"{key}.count", f"a learner runs as one instance (it alone publishes weights), got {count}")
        out.append(RoleConfig(name=rname, function=role.name, kind=role.kind, count=int(count),
                              gpus=gpus, settings=settings, overrides=overrides))
    learners = [r.name for r in out if r.kind == "learner"]
    if len(out) == len(value) and len(learners) != 1:
        able = sorted(r.name for r in registry().values() if r.kind == "learner")
        bad("roles", f"needs exactly one learner role (its step budget ends the experiment), found "
                     f"{len(learners)}{': ' + ', '.join(learners) if learners else ''}; learner functions: "
                     f"{', '.join(able)}")
    return out


def _function(key: str, value: Any, bad: Any) -> Role | None:
    names = sorted(registry())
    if value is None:
        bad(f"{key}.function", f"required key is missing (registered role functions: {', '.join(names)})")
        return None
    try:
        return get_role(str(value))
    except UnknownRoleError as exc:
        bad(f"{key}.function", f"{exc}{did_you_mean(str(value), names)}")
        return None


def _resources(key: str, value: Any, bad: Any) -> float:
    if not isinstance(value, dict):
        bad(f"{key}.resources", "must be a mapping like {gpus: 0}")
        return 0.0
    for k in value:
        if k != "gpus":
            bad(f"{key}.resources.{k}", f"unknown key{did_you_mean(str(k), ['gpus'])}; valid: gpus")
    gpus = value.get("gpus", 0)
    if gpus_problem(gpus) is not None or (isinstance(gpus, int | float) and gpus > 1):
        bad(f"{key}.resources.gpus", f"must be 0 (CPU) or a share of one GPU up to 1 (0.25, 0.5, 1), got {gpus!r}")
        return 0.0
    return float(gpus)


def _settings(key: str, value: Any, role: Role | None, bad: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        bad(key, "must be a mapping of the role function's settings")
        return {}
    if role is not None:
        for name, v in value.items():
            spec = role.settings.get(str(name))
            if spec is None:
                bad(f"{key}.{name}", f"unknown setting {name!r} for role function {role.name!r}"
                                     f"{did_you_mean(str(name), list(role.settings))}; valid: "
                                     f"{', '.join(role.settings) or 'none'}")
            elif (problem := spec.problem(v)) is not None:
                bad(f"{key}.{name}", problem)
    return dict(value)


def _weights(value: Any, bad: Any) -> tuple[int, int, int]:
    if not isinstance(value, dict):
        bad("weights", "must be a mapping {keep, chunk_mb, unscored}")
        return 3, 8, 4
    for k in value:
        if k not in WEIGHT_KEYS:
            bad(f"weights.{k}", f"unknown key{did_you_mean(str(k), list(WEIGHT_KEYS))}; valid: {', '.join(WEIGHT_KEYS)}")
    keep, chunk, unscored = value.get("keep", 3), value.get("chunk_mb", 8), value.get("unscored", 4)
    if not _int(keep) or not 1 <= keep <= 1000:
        bad("weights.keep", f"must be an integer from 1 to 1000 (versions kept besides the best), got {keep!r}")
        keep = 3
    if not _int(chunk) or not 1 <= chunk <= 256:
        bad("weights.chunk_mb", f"must be an integer from 1 to 256 (MiB; a Redis value holds at most 512 MB), got {chunk!r}")
        chunk = 8
    if not _int(unscored) or not 1 <= unscored <= UNSCORED_MAX:
        bad("weights.unscored", f"must be an integer from 1 to {UNSCORED_MAX} (versions held in Redis until an "
                                f"evaluator scores them; the learner waits beyond), got {unscored!r}")
        unscored = 4
    return int(keep), int(chunk), int(unscored)


def _experience(value: Any, bad: Any) -> int:
    if not isinstance(value, dict):
        bad("experience", "must be a mapping {maxlen}")
        return 50_000
    for k in value:
        if k != "maxlen":
            bad(f"experience.{k}", f"unknown key{did_you_mean(str(k), ['maxlen'])}; valid: maxlen")
    maxlen = value.get("maxlen", 50_000)
    if not _int(maxlen) or not 100 <= maxlen <= 100_000_000 or (isinstance(maxlen, float) and not math.isfinite(maxlen)):
        bad("experience.maxlen", f"must be an integer from 100 to 100000000 (samples in Redis at most), got {maxlen!r}")
        return 50_000
    return int(maxlen)
