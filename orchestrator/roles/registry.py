"""Role functions: the only code a worker runs for a role task, as trainers are.

A role is a plain function `fn(ctx: RoleContext) -> None` (orchestrator.roles.instance)
with a kind (`learner`, `actor`, `evaluator`: what the orchestrator expects of it) and
a declaration of its settings (orchestrator.trainers.Param). Built-in roles are the
tic-tac-toe example's; others come from the `orchestrator.roles` entry-point group. A
message naming anything else is refused before any code is imported for it.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import UnknownTrainerError
from .role import KINDS, Role

__all__ = ["KINDS", "Role", "UnknownRoleError", "get_role", "registry"]

class UnknownRoleError(UnknownTrainerError):
    """A role function name that is not registered on this process."""


_REGISTRY: dict[str, Role] | None = None


def registry() -> dict[str, Role]:
    global _REGISTRY
    if _REGISTRY is None:
        from . import tictactoe

        reg = {r.name: r for r in tictactoe.ROLES}
        for ep in entry_points(group="orchestrator.roles"):
            if ep.name in reg:
                continue
            found = ep.load()
            for role in found if isinstance(found, list | tuple) else [found]:
                if not isinstance(role, Role):
                    raise TypeError(f"entry point {ep.name} does not provide orchestrator.roles.registry.Role objects")
                reg[role.name] = role
        _REGISTRY = reg
    return _REGISTRY


def get_role(name: str) -> Role:
    reg = registry()
    if name not in reg:
        raise UnknownRoleError(f"role function {name!r} is not registered (registered: {', '.join(sorted(reg))})")
    return reg[name]
