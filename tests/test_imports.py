"""The structure stays easy to see: no import cycle between the project's modules
(imports inside functions included), and no module imports another module's private
name. Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGES = ("orchestrator", "tasks")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    found["celeryconfig"] = REPO / "celeryconfig.py"
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


MISSING: list[tuple[str, str]] = []  # (importer, module): imports of project modules that do not exist


def imports() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the project modules it imports (anywhere in it); and every import of a
    private name from another module: (importer, module, name). Imports of project
    modules that do not exist go to MISSING."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[tuple[str, str, str]] = []
    MISSING.clear()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [(base, [alias.name for alias in node.names])]
            for base, names in targets:
                if base.split(".")[0] in PACKAGES and base not in modules:
                    MISSING.append((name, base))
                for imported in names:
                    full = f"{base}.{imported}"
                    if full in modules:  # `from package import module`
                        graph[name].add(full)
                    elif imported.startswith("_") and not imported.startswith("__") and base in modules:
                        private.append((name, base, imported))
                # The module itself, unless only its submodules were imported from it.
                if base in modules and (not names or any(f"{base}.{n}" not in modules for n in names)):
                    graph[name].add(base)
                elif not names:  # `import a.b.c`: the deepest project module named
                    parts = base.split(".")
                    for i in range(len(parts), 0, -1):
                        if ".".join(parts[:i]) in modules:
                            graph[name].add(".".join(parts[:i]))
                            break
    for name in graph:
        graph[name].discard(name)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_counting_imports_inside_functions() -> None:
    graph, _ = imports()
    assert len(graph) > 40  # the project's modules were found
    assert cycles(graph) == []


def test_no_module_imports_another_modules_private_name() -> None:
    _, private = imports()
    assert private == []


def test_every_import_of_the_projects_modules_names_one_that_exists() -> None:
    imports()  # (a function-level import is only checked when it runs: this reads them all)
    assert MISSING == []


def test_the_checks_can_fail() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _resolve("orchestrator.cli.base", False, 2, "paths") == "orchestrator.paths"
    assert _resolve("orchestrator.cli", True, 1, "base") == "orchestrator.cli.base"
