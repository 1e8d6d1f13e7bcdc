"""`orchestrator flower`: the command line it builds, its refusals and exit codes, and a
real Flower (on a private redis-server) with auth, /metrics, max_tasks and saved state."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster.flowerconf import (
    DEFAULT_MAX_TASKS,
    FlowerAuthError,
    FlowerOptions,
    basic_auth,
    db_path,
    default_state_dir,
    flower_command,
)
from orchestrator.cluster.local import free_port, spawn, stop_process
from orchestrator.errors import OrchestratorError

from .conftest import celery_app, cli_env, run_cli, wait_for

CREDS = {"ORCH_FLOWER_USER": "ops", "ORCH_FLOWER_PASSWORD": "s3cret-pw"}
BROKER = "redis://:brokerpw@head.example:6380/2"


def _opts(tmp_path: Path, **kw: Any) -> FlowerOptions:
    return FlowerOptions(state_dir=tmp_path, **kw)


# --- the command line and environment it builds ------------------------------------

def test_flower_runs_celery_with_the_project_app_and_no_bare_broker(tmp_path: Path) -> None:
    argv, env, db = flower_command(_opts(tmp_path), BROKER, {**CREDS, "PATH": "/bin"})
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "tasks", "flower"]
    assert not [a for a in argv if a in ("-b", "--broker") or a.startswith("--broker=")]
    # The broker reaches celeryconfig through the environment, so the visibility
    # timeout and every other setting are the workers' own.
    assert env["ORCH_BROKER_URL"] == BROKER
    assert argv[6:] == ["--address=127.0.0.1", "--port=5555", "--persistent=True", f"--db={db}",
                        "--state_save_interval=60000", f"--max_tasks={DEFAULT_MAX_TASKS}",
                        "--tasks_columns=args,name,state,received,runtime,worker,uuid,exception",
                        "--enable_events=False"]  # the workers send events (-E); no remote control
    assert DEFAULT_MAX_TASKS == 20_000
    assert db == tmp_path / "flower-state-head.example-6380-2"


def test_credentials_go_to_flower_through_its_environment_never_argv(tmp_path: Path) -> None:
    argv, env, _ = flower_command(_opts(tmp_path), BROKER, {**CREDS, "PATH": "/bin"})
    assert env["FLOWER_BASIC_AUTH"] == "ops:s3cret-pw"
    assert "ORCH_FLOWER_PASSWORD" not in env
    assert not [a for a in argv if "s3cret-pw" in a or "basic_auth" in a or "brokerpw" in a]
    # Flower's own variable works too, and may list several users.
    _, env2, _ = flower_command(_opts(tmp_path), BROKER, {"FLOWER_BASIC_AUTH": "a:1,b:2"})
    assert env2["FLOWER_BASIC_AUTH"] == "a:1,b:2"
    # ORCH_FLOWER_* win over FLOWER_BASIC_AUTH when both are set.
    assert basic_auth({**CREDS, "FLOWER_BASIC_AUTH": "x:y"}) == "ops:s3cret-pw"


def test_options_reach_flower(tmp_path: Path) -> None:
    opts = _opts(tmp_path / "st", address="0.0.0.0", port=8080, max_tasks=500, save_interval=2.5,
                 purge_offline_workers=3600, read_only=True, extra=("--url_prefix=flower",))
    argv, _, db = flower_command(opts, "redis://127.0.0.1:6379/0", CREDS)
    assert argv[6:] == ["--address=0.0.0.0", "--port=8080", "--persistent=True",
                        f"--db={tmp_path / 'st' / 'flower-state-127.0.0.1-6379-0'}",
                        "--state_save_interval=2500", "--max_tasks=500",
                        "--tasks_columns=args,name,state,received,runtime,worker,uuid,exception",
                        "--enable_events=False",
                        "--purge_offline_workers=3600", "--read_only=True", "--url_prefix=flower"]


def test_no_auth_removes_every_credential(tmp_path: Path) -> None:
    _, env, _ = flower_command(_opts(tmp_path, auth=False), BROKER,
                               {"FLOWER_BASIC_AUTH": "a:b", "ORCH_FLOWER_PASSWORD": "p"})
    assert "FLOWER_BASIC_AUTH" not in env and "ORCH_FLOWER_PASSWORD" not in env


@pytest.mark.parametrize(("environ", "message"), [
    ({}, "Flower needs credentials: set ORCH_FLOWER_USER and ORCH_FLOWER_PASSWORD"),
    ({"ORCH_FLOWER_USER": "ops"}, "ORCH_FLOWER_PASSWORD is not set"),
    ({"ORCH_FLOWER_PASSWORD": "pw"}, "ORCH_FLOWER_USER is not set"),
    ({"ORCH_FLOWER_USER": "a:b", "ORCH_FLOWER_PASSWORD": "pw"}, "must not contain ':' or ','"),
    ({"ORCH_FLOWER_USER": "ops", "ORCH_FLOWER_PASSWORD": "p,w"}, "must not contain ','"),
    ({"FLOWER_BASIC_AUTH": "opsonly"}, "FLOWER_BASIC_AUTH must be user:password"),
    ({"FLOWER_BASIC_AUTH": "a:1,:2"}, "FLOWER_BASIC_AUTH must be user:password"),
])
def test_unusable_credentials_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(FlowerAuthError, match=message):
        basic_auth(environ)


@pytest.mark.parametrize(("extra", "message"), [
    ("--broker=redis://x:1/0", "the broker comes from celeryconfig"),
    ("-b", "the broker comes from celeryconfig"),
    ("--basic_auth=u:p", "visible in `ps`"),
    ("--port=1", "set by this command"),
    ("--max-tasks=1", "set by this command"),
    ("--no_such_option=1", "not a Flower option"),
    ("--url_prefix", "in the form --name=value"),
])
def test_pass_through_options_that_would_undo_the_set_up_are_refused(
        tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(OrchestratorError, match=message):
        flower_command(_opts(tmp_path, extra=(extra,)), BROKER, CREDS)


def test_state_file_per_broker_without_its_password(tmp_path: Path) -> None:
    a = db_path(tmp_path, "redis://:pw@h1:6379/0")
    assert a == tmp_path / "flower-state-h1-6379-0"
    assert db_path(tmp_path, "redis://h1:6379/1") != a != db_path(tmp_path, "redis://h2:6379/0")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/orchestrator/flower")
    assert str(default_state_dir({})).endswith(".local/state/orchestrator/flower")


# --- the command: refusals and exit codes (nothing is started, nothing reached) ----------

def _closed_broker() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nobody listens: never the default 6379


def test_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    proc = run_cli("flower", "--state-dir", str(tmp_path), env=cli_env(ORCH_BROKER_URL=_closed_broker()))
    assert proc.returncode == 2
    assert "Flower needs credentials: set ORCH_FLOWER_USER and ORCH_FLOWER_PASSWORD" in proc.stderr
    assert "--no-auth" in proc.stderr
    proc = run_cli("flower", env=cli_env(ORCH_BROKER_URL=_closed_broker(), ORCH_FLOWER_USER="ops"))
    assert proc.returncode == 2
    assert "ORCH_FLOWER_PASSWORD is not set" in proc.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    env = cli_env(**CREDS)
    cases = [
        (["--broker", "http://host:6379/0"], "is not a usable Redis URL"),
        (["--broker", _closed_broker(), "--port", "0"], "0 is not in the range 1<=x<=65535"),
        (["--broker", _closed_broker(), "--max-tasks", "10"], "10 is not in the range x>=100"),
        (["--broker", _closed_broker(), "--", "--broker=redis://x:1/0"], "the broker comes from celeryconfig"),
    ]
    for args, message in cases:
        proc = run_cli("flower", "--state-dir", str(tmp_path), *args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    proc = run_cli("flower", "--state-dir", str(tmp_path),
                   env=cli_env(ORCH_BROKER_URL=_closed_broker(), ORCH_VISIBILITY_TIMEOUT="soon", **CREDS))
    assert proc.returncode == 2
    assert "ORCH_VISIBILITY_TIMEOUT='soon' is not valid" in proc.stderr


def test_environment_problems_exit_3(tmp_path: Path) -> None:
    env = cli_env(**CREDS)
    broker = _closed_broker()
    proc = run_cli("flower", "--broker", broker, "--state-dir", str(tmp_path), "--port", str(free_port()), env=env)
    assert proc.returncode == 3
    assert f"cannot reach the broker at {broker}" in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("flower", "--broker", broker, "--state-dir", str(tmp_path), "--port", str(port), env=env)
    assert proc.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("flower", "--broker", broker, "--state-dir", str(blocker / "sub"), env=env)
    assert proc.returncode == 3
    assert f"state folder {blocker / 'sub'} is not writable" in proc.stderr


# --- a real Flower ---------------------------------------------------------------------

def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _start_flower(url: str, tmp_path: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    proc = spawn([sys.executable, "-m", "orchestrator", "flower", "--port", str(port),
                  "--state-dir", str(tmp_path / "state"), *args],
                 cli_env(ORCH_BROKER_URL=url, **CREDS), tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(base + "/healthcheck")[0] == 200 or proc.poll() is not None, timeout=60,
             what="Flower to answer /healthcheck")
    assert proc.poll() is None, (tmp_path / "flower.log").read_text()
    return proc


def _task_ids(base: str) -> set[str]:
    status, body = _get(base + "/api/tasks", auth=("ops", "s3cret-pw"))
    assert status == 200, body
    return set(json.loads(body))


def test_real_flower_auth_metrics_bounded_and_persistent(private_redis: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_flower(private_redis, tmp_path, port, "--max-tasks", "100")
    try:
        # exec: the process the CLI started IS Flower, and no secret is on its command line.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:7] == [b"-m", b"celery", b"-A", b"tasks", b"flower", b"--address=127.0.0.1"]
        assert b"s3cret-pw" not in b" ".join(cmdline)
        assert _get(base + "/")[0] == 401
        assert _get(base + "/api/workers")[0] == 401
        assert _get(base + "/", auth=("ops", "wrong"))[0] == 401
        assert _get(base + "/", auth=("ops", "s3cret-pw"))[0] == 200
        status, metrics = _get(base + "/metrics")  # Prometheus scrapes without a login
        assert status == 200 and b"# TYPE flower_events_total counter" in metrics

        # 150 task events (as a worker sends them); Flower keeps the newest 100.
        sent = [str(uuid.uuid4()) for _ in range(150)]
        with celery_app(private_redis).events.default_dispatcher(hostname="cpu9@test") as dispatcher:
            for i, task_id in enumerate(sent):
                dispatcher.send("task-received", uuid=task_id, name="tasks.train_run",
                                args=f"'exp/iris/base/seed=0/fold={i}'", kwargs="{}", retries=0)
                dispatcher.send("task-started", uuid=task_id)
                dispatcher.send("task-succeeded", uuid=task_id, result="{}", runtime=0.5)
        wait_for(lambda: sent[-1] in _task_ids(base), timeout=30, what="the last task in Flower")
        kept = _task_ids(base)
        assert len(kept) == 100 and kept == set(sent[-100:])

        # SIGTERM (what systemd sends): Flower saves its state and exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert list((tmp_path / "state").glob("flower-state-127.0.0.1-*"))
    finally:
        stop_process(proc)

    proc = _start_flower(private_redis, tmp_path, port, "--max-tasks", "100")
    try:
        assert _task_ids(base) == kept, "the restarted Flower lost its task history"
        status, body = _get(base + f"/api/task/info/{sent[-1]}", auth=("ops", "s3cret-pw"))
        info = json.loads(body)
        assert (info["state"], info["args"], info["worker"]) == (
            "SUCCESS", "'exp/iris/base/seed=0/fold=149'", "cpu9@test")
    finally:
        stop_process(proc)
