"""Shared by the benchmarks that compare this tree with another git ref."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What scripts/install.sh compiles (keep the two the same).
COMPILED = ["orchestrator", "tasks", "celeryconfig.py"]


def compile_tree(tree: Path) -> Path:
    """Compile `tree`'s bytecode as scripts/install.sh does, so that a tree under test
    starts its processes as an installed one does (a stale file is compiled again)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash",
                    *COMPILED], cwd=tree, check=True, capture_output=True)
    return tree


def export_ref(ref: str, dest: Path, compiled: bool = False) -> Path:
    """The files of `ref` (`git archive`), unpacked into the new folder `dest`; with
    `compiled`, its bytecode compiled as an install would (compile_tree)."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return compile_tree(dest) if compiled else dest
