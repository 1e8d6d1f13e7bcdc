"""The code base stays ruff- and mypy-clean (configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


API_SCRIPTS = ["tests/api_trainers.py", "tests/api_search.py", "tests/api_notebook.py",
               "tests/api_search_block.py"]


def test_mypy_is_clean() -> None:
    """One mypy run over the package, with the public API and the scripts that use it the
    way docs/api.md shows (tests/test_api.py runs them) held to --strict's flags
    (pyproject.toml: [[tool.mypy.overrides]])."""
    assert (REPO / "orchestrator" / "py.typed").is_file()
    proc = subprocess.run([sys.executable, "-m", "mypy", "orchestrator", "tasks", "celeryconfig.py", *API_SCRIPTS],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_public_api_is_held_to_strict_flags() -> None:
    """Every module of the public API is under the strict overrides (a module added to
    orchestrator/api/ is covered by its pattern; orchestrator/__init__.py by name)."""
    import tomllib

    overrides = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    strict = next(o for o in overrides if o.get("disallow_untyped_defs"))
    assert {"orchestrator", "orchestrator.api.*", "orchestrator.trainers.functions"} <= set(strict["module"])
    assert {f"tests.{p[6:-3]}" for p in API_SCRIPTS} <= set(strict["module"])
    assert all(strict[k] is True for k in ("disallow_any_generics", "disallow_untyped_calls", "warn_return_any",
                                           "strict_equality", "extra_checks", "check_untyped_defs"))
    assert strict["implicit_reexport"] is False
