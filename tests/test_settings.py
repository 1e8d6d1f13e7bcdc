"""Every ORCH_* setting is declared once (orchestrator.settings): a bad value is refused
by every entry point before it starts or enqueues anything (exit 2, the variable, its
value and what is valid, no traceback), and the settings table (docs/settings.md) lists the
same names and defaults."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from orchestrator import settings
from orchestrator.errors import SettingError

from .conftest import REPO, cli_env

ENTRY_POINTS = {
    "run": [sys.executable, "-m", "orchestrator", "run", "configs/iris_kfold.yaml"],
    "submit": [sys.executable, "-m", "orchestrator", "submit", "configs/iris_kfold.yaml"],
    "worker": [sys.executable, "-m", "orchestrator", "worker", "--cpu"],
    "workers up": [sys.executable, "-m", "orchestrator", "workers", "up", "--cpu", "1"],
    "flower": [sys.executable, "-m", "orchestrator", "flower"],
    "watch": [sys.executable, "-m", "orchestrator", "watch", "iris_kfold"],
    "status": [sys.executable, "-m", "orchestrator", "status", "iris_kfold"],
    "celery worker": [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "cpu"],
}
BAD = [("ORCH_LEASE_SECONDS", "abc"), ("ORCH_WATCHDOG_INTERVAL", "never"), ("ORCH_FSYNC", "maybe"),
       ("ORCH_RESULTS_TRANSFER", "carrier-pigeon"), ("ORCH_GPU", "0,x"), ("ORCH_VISIBILITY_TIMEOUT", "-5"),
       ("ORCH_PROGRESS_INTERVAL", "nan"), ("ORCH_EXIT_WHEN_IDLE", "0")]


@pytest.mark.parametrize(("entry", "bad"), list(zip(ENTRY_POINTS, BAD, strict=True)))
def test_every_entry_point_refuses_a_bad_setting_before_it_starts(entry: str, bad: tuple[str, str]) -> None:
    name, raw = bad
    env = cli_env(**{name: raw, "ORCH_BROKER_URL": "redis://127.0.0.1:1/0"})
    proc = subprocess.run(ENTRY_POINTS[entry], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (entry, proc.stdout, proc.stderr)
    assert f"{name}={raw!r} is not valid: give " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "local mode" not in proc.stdout + proc.stderr  # nothing was started


def test_each_kind_has_one_rule() -> None:
    assert settings.value("ORCH_LEASE_SECONDS", {}) == 10.0
    assert settings.value("ORCH_LEASE_SECONDS", {"ORCH_LEASE_SECONDS": " 2.5 "}) == 2.5
    assert settings.value("ORCH_FSYNC", {"ORCH_FSYNC": "off"}) is False
    assert settings.value("ORCH_GPU", {"ORCH_GPU": "0, 3"}) == [0, 3]
    assert settings.value("ORCH_TRAINER_MODULES", {"ORCH_TRAINER_MODULES": "a.b,c"}) == ["a.b", "c"]
    assert settings.value("ORCH_EVENT_FLUSH_INTERVAL", {"ORCH_EVENT_FLUSH_INTERVAL": "0"}) == 0.0
    for name, raw in [("ORCH_LEASE_SECONDS", "inf"), ("ORCH_RETURN_MAX_MB", "0"), ("ORCH_RETURN_MAX_MB", "513"),
                      ("ORCH_TORCH_THREADS", "1.5"), ("ORCH_DEVICE", "tpu"), ("ORCH_BROKER_URL", "http://x"),
                      ("ORCH_TRAINER_MODULES", "a b"), ("ORCH_WORKER_HEARTBEAT", "0")]:
        with pytest.raises(SettingError, match=re.escape(f"{name}={raw!r} is not valid: give ")):
            settings.value(name, {name: raw})
    with pytest.raises(SettingError, match="2 settings are not valid"):
        settings.check_all({"ORCH_FSYNC": "maybe", "ORCH_GPU": "x"})


def test_the_readme_table_lists_every_setting_with_its_default() -> None:
    text = (REPO / "README.md").read_text()
    for doc in (REPO / "docs").glob("*.md"):
        text += doc.read_text()
    rows = dict(re.findall(r"^\| `(ORCH_[A-Z_]+)` \| ([^|]+) \|", text, flags=re.M))
    declared = {name: s.shown for name, s in settings.SETTINGS.items()}
    assert set(rows) == set(declared), (set(rows) ^ set(declared))
    wrong = {n: (rows[n].strip(), declared[n]) for n in declared if rows[n].strip() != declared[n]}
    assert wrong == {}
    # No ORCH_* variable is read anywhere but through the declarations.
    stray = []
    for path in [*REPO.glob("orchestrator/**/*.py"), *REPO.glob("tasks/*.py"), REPO / "celeryconfig.py"]:
        for match in re.finditer(r"environ(?:\.get)?\(?\[?[\"'](ORCH_[A-Z_]+)", path.read_text()):
            stray.append((path.name, match.group(1)))
    assert [s for s in stray if s[1] not in ("ORCH_BROKER_URL", "ORCH_RESULT_BACKEND", "ORCH_STATE_URL",
                                              "ORCH_RESULTS_ROOT")] == [], stray
