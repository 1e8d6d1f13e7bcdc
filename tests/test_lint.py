"""The code base stays ruff- and mypy-clean (configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "orchestrator", "tasks", "celeryconfig.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_public_api_is_mypy_strict_clean() -> None:
    """`import orchestrator as orch` is typed (py.typed): its modules, and scripts that use
    it the way docs/api.md shows (the test scripts of tests/test_api.py), pass mypy --strict."""
    assert (REPO / "orchestrator" / "py.typed").is_file()
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "orchestrator/__init__.py", "orchestrator/api", "orchestrator/trainers/functions.py",
                           "tests/api_trainers.py", "tests/api_search.py", "tests/api_notebook.py",
                           "tests/api_search_block.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
