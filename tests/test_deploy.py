"""Every shipped file in deploy/ that is ours runs here: the launcher on this machine
(against its own Redis on a free port, never 6379) and the systemd units through
`systemd-analyze verify`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import redis

from orchestrator.cluster import registry
from orchestrator.cluster.local import free_port

from .conftest import REPO, cli_env, run_cli

DEPLOY = REPO / "deploy"
HOST = socket.gethostname()
UNITS = ["orchestrator-gpu-worker@.service", "orchestrator-control.service"]
INSTALLED_EXE = "/opt/orchestrator/venv/bin/orchestrator"


def launch(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(DEPLOY / "launch.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert "Traceback (most recent call last)" not in proc.stderr, proc.stderr
    return proc


def _launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # No NVIDIA driver (fake NVML): `workers N` starts CPU workers on any machine.
    return cli_env(LAUNCH_DIR=str(tmp_path / "launch"), ORCH_RESULTS_ROOT=str(tmp_path / "results"),
                   ORCH_PRELOAD="0", ORCH_WORKER_HEARTBEAT="1", ORCH_NVML_MODULE="tests.fake_nvml",
                   ORCHESTRATOR=f"{sys.executable} -m orchestrator", PYTHON=sys.executable, **extra)


def test_launcher_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    env = _launch_env(tmp_path)
    nopass = launch("head", env=env)
    assert nopass.returncode == 2 and "set REDIS_PASSWORD" in nopass.stderr
    nobroker = launch("workers", "2", env=env)
    assert nobroker.returncode == 2 and "set ORCH_BROKER_URL" in nobroker.stderr
    notanumber = launch("workers", "two", env=env)
    assert notanumber.returncode == 2 and "N must be a number" in notanumber.stderr
    machine = tmp_path / "nvml.json"
    machine.write_text(json.dumps({"driver": "550", "gpus": [{"name": "G", "memory_total_mb": 1}] * 2}))
    toomany = launch("workers", "3", env={**env, "ORCH_BROKER_URL": "redis://127.0.0.1:1/0",
                                          "ORCH_FAKE_NVML": str(machine)})
    assert toomany.returncode == 2 and "only 2 GPUs" in toomany.stderr
    usage = launch(env=env)
    assert usage.returncode == 2 and "deploy/launch.sh workers N" in usage.stdout
    assert not (tmp_path / "launch").exists()  # nothing was started or written


@pytest.mark.integration
def test_launcher_head_then_workers_then_stop(tmp_path: Path) -> None:
    port = free_port()
    password = 'pa ss/w"o\\rd+%'  # characters special to URLs and to redis.conf, on purpose
    env = _launch_env(tmp_path, REDIS_PASSWORD=password, REDIS_PORT=str(port), REDIS_BIND="127.0.0.1")
    try:
        head = launch("head", env=env)
        assert head.returncode == 0, head.stdout + head.stderr
        assert f"port {port}" in head.stdout and f"control@{HOST}" in head.stdout
        assert password not in head.stdout  # URLs are printed with the password masked
        conf = tmp_path / "launch" / "redis" / "redis.conf"
        assert oct(conf.stat().st_mode & 0o777) == "0o600"  # it holds the password

        with pytest.raises(redis.RedisError, match="(?i)auth"):
            redis.Redis(port=port).ping()  # no password, no service
        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        settings = {k: client.config_get(k)[k] for k in ("appendonly", "maxmemory-policy", "port")}
        assert settings == {"appendonly": "yes", "maxmemory-policy": "noeviction", "port": str(port)}

        env["ORCH_BROKER_URL"] = url
        workers = launch("workers", "2", env=env)
        assert workers.returncode == 0, workers.stdout + workers.stderr
        assert "no GPU" in workers.stdout and "2 workers registered" in workers.stdout
        records = {r.name: r for r in registry.list_workers(client)}
        assert set(records) == {f"control@{HOST}", f"cpu1@{HOST}", f"cpu2@{HOST}"}
        assert records[f"control@{HOST}"].queues == ["control"]

        status = launch("status", env={**env, "COLUMNS": "200"})
        assert status.returncode == 0 and f"cpu2@{HOST}" in status.stdout and "3 workers" in status.stdout

        redis_pid = int((tmp_path / "launch" / "redis" / "redis.pid").read_text())
        pids = [redis_pid] + [r.pid for r in records.values()]
        stop = launch("stop", env=env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "stopped: cpu1 (stopped), cpu2 (stopped)" in stop.stdout and "redis: stopped" in stop.stdout
        assert not any(psutil.pid_exists(p) for p in pids)
    finally:
        launch("stop", env=env, timeout=120)
        pidfile = tmp_path / "launch" / "redis" / "redis.pid"
        if pidfile.exists():  # the launcher failed to stop its Redis: never leave it running
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _exec_start(text: str) -> list[str]:
    match = re.search(r"^ExecStart=(.*(?:\\\n.*)*)", text, re.M)
    assert match, "no ExecStart="
    return shlex.split(match.group(1).replace("\\\n", " "))


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed here (Debian/Ubuntu: package systemd)")
    text = (DEPLOY / unit).read_text()
    assert INSTALLED_EXE in text
    # verify insists that ExecStart's program exists: point it at this checkout's CLI.
    wrapper = tmp_path / "orchestrator"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m orchestrator \"$@\"\n")
    wrapper.chmod(0o755)
    instance = unit.replace("@.service", "@0.service")  # a template is verified as an instance
    (tmp_path / instance).write_text(text.replace(INSTALLED_EXE, str(wrapper)))
    proc = subprocess.run([exe, "verify", str(tmp_path / instance)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_command_line_is_accepted_by_the_cli(unit: str) -> None:
    argv = _exec_start((DEPLOY / unit).read_text())
    assert argv[0] == INSTALLED_EXE
    args = [a.replace("%i", "0") for a in argv[1:]]
    checked = run_cli(*args, "--help", env=cli_env())  # an unknown option fails even with --help
    assert checked.returncode == 0, checked.stderr
