"""Flower in a real browser: headless Debian Chromium, driven by Playwright.

Everything is real: a private redis-server, `orchestrator worker` processes (a "GPU"
worker on queues gpu.<host>.0/gpu, a CPU worker, a control worker), `orchestrator
flower` with credentials, and `orchestrator submit`. The browser logs in, watches runs
go STARTED -> SUCCESS, opens a failed run's detail, and sees the CPU worker go offline
after its process group is killed. Screenshots land in test-artifacts/flower/.

On a machine without a GPU the "GPU" worker is real and online but idle: every run
here asks for `gpus: 0`, so nothing is routed to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster.local import free_port, spawn, start_redis, stop_process

from .conftest import REPO, cli_env, run_cli, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
# Flags that work with no network and no display (and as root, in a container).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = REPO / "test-artifacts" / "flower"
USER, PASSWORD = "ops", "flower-test-pw"
HOST = socket.gethostname()


@dataclass
class Stack:
    url: str  # the broker
    flower: str  # http://127.0.0.1:PORT
    root: Path
    processes: dict[str, subprocess.Popen[bytes]]
    logs: Path

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root), **extra)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis, three workers and Flower, all ours; all stopped at the end, whatever happens."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install.sh --test` (apt-get install chromium)")
    redis_proc, url = start_redis(tmp_path / "redis")
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    st = Stack(url, f"http://127.0.0.1:{port}", tmp_path / "results", {"redis": redis_proc}, logs)
    try:
        base = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
        # ORCH_PRELOAD=0: the idle GPU worker need not import torch on a CPU machine.
        workers = {"gpu0": ([*base, "--gpu", "0"], st.env(ORCH_PRELOAD="0")),
                   "cpu1": ([*base, "--cpu", "--name", "cpu1@%h"], st.env()),
                   "control": ([*base, "--control"], st.env())}
        for name, (argv, env) in workers.items():
            st.processes[name] = spawn(argv, env, logs / f"{name}.log")
        flower_env = st.env(ORCH_FLOWER_USER=USER, ORCH_FLOWER_PASSWORD=PASSWORD)
        st.processes["flower"] = spawn(
            [sys.executable, "-m", "orchestrator", "flower", "--port", str(port),
             "--state-dir", str(tmp_path / "flower-state")], flower_env, logs / "flower.log")
        wait_for(lambda: _http_ok(f"{st.flower}/healthcheck") or st.processes["flower"].poll() is not None,
                 timeout=60, what="Flower to answer /healthcheck")
        assert st.processes["flower"].poll() is None, st.log("flower")
        yield st
    finally:
        for name, proc in st.processes.items():
            if name != "redis":
                stop_process(proc)
        stop_process(redis_proc)


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        # Debian's chromium, never a browser Playwright would download.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _task_rows(page: Any) -> list[dict[str, Any]]:
    """The rows the tasks table shows (its DataTables model: what each cell renders)."""
    rows: list[dict[str, Any]] = page.evaluate("() => $('#tasks-table').DataTable().rows().data().toArray()")
    return rows


def _poll_tasks(page: Any, url: str, ok: Callable[[list[dict[str, Any]]], bool],
                timeout: float, what: str) -> list[dict[str, Any]]:
    """Reload the tasks page until its rows satisfy `ok` (the page does not refresh itself)."""
    deadline = time.monotonic() + timeout
    while True:
        page.goto(url)
        # ajax.json() is set once the table's first answer arrived and was drawn.
        page.wait_for_function("() => window.$ && $.fn.dataTable.isDataTable('#tasks-table')"
                               " && $('#tasks-table').DataTable().ajax.json() !== undefined")
        rows = _task_rows(page)
        if ok(rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; the page showed {rows}")
        page.wait_for_timeout(300)


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Flower's /metrics, fetched WITHOUT credentials, as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _worker_row(page: Any, name: str) -> Any:
    return page.locator("#workers-table tbody tr", has_text=name)


def _experiments(tmp_path: Path) -> list[Path]:
    import yaml

    common = {"datasets": ["iris"], "folds": 2, "seeds": [0], "resources": {"gpus": 0}}
    docs = {
        # `slow` (tests/plugins.py): prior baseline after a 3 s sleep, long enough for the
        # browser to see a run STARTED before it reaches SUCCESS.
        "flower_demo": {"trainer": "slow", "params": {"seconds": 3.0}},
        # `flaky` raises on fold 0 (a FAILURE with an error) and trains fold 1 (SUCCESS).
        "flower_fail": {"trainer": "flaky", "params": {"fail_fold": 0}},
    }
    paths = []
    for name, fields in docs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"experiment": name, **fields, **common}, sort_keys=False))
        paths.append(path)
    return paths


def test_flower_in_a_browser(stack: Stack, browser: Any, tmp_path: Path) -> None:
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()

    # 1. No login, or a wrong one: Flower answers 401 with a Basic challenge, and the
    #    browser (which cannot show a login dialog headless) refuses the page.
    sync_api = pytest.importorskip("playwright.sync_api")
    anonymous = browser.new_context()
    response = anonymous.request.get(stack.flower + "/")
    assert response.status == 401
    assert response.headers["www-authenticate"] == 'Basic realm="flower"'
    with pytest.raises(sync_api.Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
        anonymous.new_page().goto(stack.flower + "/")
    anonymous.close()
    wrong = browser.new_context(http_credentials={"username": USER, "password": "wrong"})
    assert wrong.request.get(stack.flower + "/tasks").status == 401
    wrong.close()

    expect = sync_api.expect
    ctx = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                              viewport={"width": 1920, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(20_000)

    # 2. Logged in: the workers page (it refreshes itself every second) lists all three online.
    assert page.goto(stack.flower + "/").status == 200
    for worker in (f"gpu0@{HOST}", f"cpu1@{HOST}", f"control@{HOST}"):
        expect(_worker_row(page, worker).locator(".badge", has_text="Online")).to_be_visible(timeout=60_000)
    expect(page.locator("#workers-online")).to_have_text("3")
    _shot(page, "01-workers-online.png")

    # 3. Submit: runs appear as tasks.train_run, argued by their readable run names.
    proc = run_cli("submit", *map(str, _experiments(tmp_path)), env=stack.env())
    assert proc.returncode == 0, proc.stderr
    demo = [f"'flower_demo/iris/base/seed=0/fold={i}'" for i in range(2)]
    tasks_url = stack.flower + "/tasks?name=tasks.train_run"

    def demo_state(rows: list[dict[str, Any]], state: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["args"] in demo and r["state"] == state]

    started = _poll_tasks(page, tasks_url, lambda rows: bool(demo_state(rows, "STARTED")), 60,
                          "a flower_demo run to be STARTED")
    run = demo_state(started, "STARTED")[0]
    assert run["worker"] == f"cpu1@{HOST}"
    row = page.locator("#tasks-table tbody tr", has_text=run["args"].strip("'"))
    expect(row.locator(".badge")).to_have_text("STARTED")
    _shot(page, "02-run-started.png")

    done = _poll_tasks(page, tasks_url, lambda rows: len(demo_state(rows, "SUCCESS")) == 2, 60,
                       "both flower_demo runs to reach SUCCESS")
    for r in demo_state(done, "SUCCESS"):
        assert r["name"] == "tasks.train_run" and r["worker"] == f"cpu1@{HOST}"
        assert r["runtime"] >= 3.0  # the trainer sleeps 3 s
        cells = page.locator("#tasks-table tbody tr", has_text=r["args"].strip("'"))
        expect(cells.locator(".badge")).to_have_text("SUCCESS")
        expect(cells).to_contain_text(f"cpu1@{HOST}")
    _shot(page, "03-runs-succeeded.png")

    # 4. The failed run: listed with its exception, and its detail page shows the error.
    failed_name = "flower_fail/iris/base/seed=0/fold=0"
    failed = _poll_tasks(page, stack.flower + "/tasks?state=FAILURE",
                         lambda rows: any(r["args"] == repr(failed_name) for r in rows), 60,
                         "the flower_fail run to be FAILURE")
    assert [r["args"] for r in failed] == [repr(failed_name)]
    page.locator("#tasks-table tbody tr", has_text=failed_name).locator(f"a[href$='/task/{failed[0]['uuid']}']").click()
    page.wait_for_url(f"**/task/{failed[0]['uuid']}")
    detail = page.locator("#task-page")
    expect(detail.locator(".badge")).to_have_text("FAILURE")
    expect(detail).to_contain_text(repr(failed_name))
    expect(detail).to_contain_text(f"ValueError('deliberate failure on fold 0 of {failed_name}')")
    expect(detail).to_contain_text("Traceback (most recent call last)")
    expect(detail).to_contain_text(f"cpu1@{HOST}")
    # Celery's task-failed event carries no runtime: the page shows when it started and failed.
    expect(detail.locator("dt", has_text="Started")).to_be_visible()
    expect(detail.locator("dt", has_text="Failed")).to_be_visible()
    _shot(page, "04-failed-run-detail.png")

    # 5. Prometheus: /metrics without a login, with this cluster's workers and tasks.
    metrics = _metrics(stack.flower)
    cpu1 = f"cpu1@{HOST}"
    assert metrics[("flower_worker_online", (("worker", cpu1),))] == 1.0
    assert metrics[("flower_events_total", (("task", "tasks.train_run"), ("type", "task-failed"),
                                            ("worker", cpu1)))] == 1.0
    assert metrics[("flower_events_total", (("task", "tasks.train_run"), ("type", "task-succeeded"),
                                            ("worker", cpu1)))] == 3.0
    assert metrics[("flower_task_runtime_seconds_count", (("task", "tasks.train_run"),
                                                          ("worker", cpu1)))] == 3.0

    # 6. The CPU worker's host "dies" (its whole process group SIGKILLed, no goodbye):
    #    Flower shows it offline once its heartbeats stop; the others stay online.
    page.goto(stack.flower + "/")
    expect(_worker_row(page, f"cpu1@{HOST}").locator(".badge", has_text="Online")).to_be_visible()
    killed = time.monotonic()
    os.killpg(stack.processes["cpu1"].pid, signal.SIGKILL)
    stack.processes["cpu1"].wait(timeout=10)
    expect(_worker_row(page, f"cpu1@{HOST}").locator(".badge", has_text="Offline")).to_be_visible(timeout=30_000)
    print(f"cpu1 shown offline {time.monotonic() - killed:.1f} s after its process group was killed")
    expect(_worker_row(page, f"gpu0@{HOST}").locator(".badge", has_text="Online")).to_be_visible()
    expect(page.locator("#workers-online")).to_have_text("2")
    _shot(page, "05-worker-offline.png")
    ctx.close()


def test_chromium_is_debians() -> None:
    """The browser the test drives is the apt package, not a downloaded one."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install.sh --test`")
    assert shutil.which("chromium") == CHROMIUM
    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("Chromium "), version
