"""Shared by the benchmarks that compare this tree with another git ref."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export_ref(ref: str, dest: Path) -> Path:
    """The files of `ref` (`git archive`), unpacked into the new folder `dest`."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest
