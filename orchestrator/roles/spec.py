"""RoleSpec: the one thing a role task's message carries (JSON), validated whole on the
worker before anything is touched: names checked before they become keys or paths, the
role function registered, every setting valid for it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidSpecError
from ..experiment.names import check_name
from .config import COUNT_MAX, DEVICES, UNSCORED_MAX, RoleConfig, RolesExperiment
from .registry import KINDS, get_role

ROLE_TASK = "tasks.role_run"


@dataclass(frozen=True)
class RoleSpec:
    experiment: str
    role: str
    function: str
    kind: str
    index: int
    count: int
    gpus: float
    settings: dict[str, Any]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep: int = 3
    chunk_mb: int = 8
    maxlen: int = 50_000
    unscored: int = 0  # versions held for the evaluators at most (0: the experiment has none)
    seed: int = 0
    submitted_at: float | None = None

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.role}.{self.index}"

    @property
    def queue(self) -> str:
        return "gpu" if self.gpus > 0 else "cpu"

    def settings_for(self, device: str) -> dict[str, Any]:
        """The role function's defaults, the stated settings, then the device's overrides."""
        return get_role(self.function).resolve({**self.settings, **self.overrides.get(device, {})})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> RoleSpec:
        """A spec from an untrusted message; InvalidSpecError (or UnknownRoleError) if
        anything in it is not what a submission would have sent."""
        if not isinstance(raw, dict):
            raise InvalidSpecError("a role spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        if extra := set(raw) - known:
            raise InvalidSpecError(f"unknown fields in a role spec: {sorted(extra)}")
        try:
            spec = cls(**raw)
        except TypeError as exc:
            raise InvalidSpecError(f"a role spec lacks fields: {exc}") from None
        check_name(spec.experiment, "experiment")
        check_name(spec.role, "role")
        role = get_role(str(spec.function))
        ints = {"index": spec.index, "count": spec.count, "keep": spec.keep, "chunk_mb": spec.chunk_mb,
                "maxlen": spec.maxlen, "unscored": spec.unscored, "seed": spec.seed}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidSpecError(f"role spec field {key} must be a non-negative integer, got {value!r}")
        if not (spec.index < spec.count <= COUNT_MAX and 1 <= spec.keep and 1 <= spec.chunk_mb <= 256
                and spec.maxlen >= 1 and spec.unscored <= UNSCORED_MAX):
            raise InvalidSpecError(f"role spec out of range: index {spec.index} of {spec.count}")
        if spec.kind != role.kind or spec.kind not in KINDS:
            raise InvalidSpecError(f"role function {role.name!r} is a {role.kind}, not a {spec.kind!r}")
        if not isinstance(spec.gpus, int | float) or isinstance(spec.gpus, bool) or not 0 <= spec.gpus <= 1:
            raise InvalidSpecError(f"role spec gpus must be 0..1, got {spec.gpus!r}")
        if spec.submitted_at is not None and (not isinstance(spec.submitted_at, int | float)
                                              or not math.isfinite(spec.submitted_at)):
            raise InvalidSpecError("role spec submitted_at must be a number")
        blocks = {"settings": spec.settings, **{f"{d}": o for d, o in _overrides(spec.overrides).items()}}
        for where, block in blocks.items():
            if not isinstance(block, dict):
                raise InvalidSpecError(f"role spec {where} must be an object")
            for name, value in block.items():
                param = role.settings.get(name)
                if param is None or (problem := param.problem(value)) is not None:
                    raise InvalidSpecError(f"role spec {where}.{name}: "
                                           f"{'unknown setting' if param is None else problem}")
        return spec


def _overrides(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - set(DEVICES):
        raise InvalidSpecError(f"role spec overrides must be an object with keys among {DEVICES}")
    return raw


def specs_of(exp: RolesExperiment, submitted_at: float) -> list[RoleSpec]:
    """One spec per role instance, the learner first."""
    ordered: list[RoleConfig] = sorted(exp.roles, key=lambda r: KINDS.index(r.kind))
    unscored = exp.unscored if any(r.kind == "evaluator" for r in exp.roles) else 0
    return [RoleSpec(experiment=exp.name, role=r.name, function=r.function, kind=r.kind, index=i,
                     count=r.count, gpus=r.gpus, settings=dict(r.settings), overrides=dict(r.overrides),
                     keep=exp.keep, chunk_mb=exp.chunk_mb, maxlen=exp.maxlen, unscored=unscored, seed=exp.seed,
                     submitted_at=submitted_at)
            for r in ordered for i in range(r.count)]
