"""What a role is: a plain function `fn(ctx: RoleContext) -> None` with a kind and a
declaration of its settings (the registry is orchestrator.roles.registry)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..trainers.base import Param

KINDS = ("learner", "actor", "evaluator")


@dataclass(frozen=True)
class Role:
    name: str  # registered name, e.g. "tictactoe.learner"
    kind: str  # one of KINDS
    fn: Callable[[Any], None]
    settings: Mapping[str, Param]
    description: str = ""

    def resolve(self, stated: Mapping[str, Any]) -> dict[str, Any]:
        return {**{k: p.default for k, p in self.settings.items()}, **stated}


