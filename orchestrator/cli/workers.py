"""Commands about this host's GPUs and the cluster's workers: gpus, workers up/down/list."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import redis
from rich.markup import escape
from rich.table import Table

from .. import errors
from ..cluster import gpu, registry, supervisor
from ..errors import EnvironmentProblem
from ..execution import transfer
from .base import check_redis_url, cli, err, out, results_root_option, results_root_path

cluster_broker_option = click.option(
    "--broker", envvar="ORCH_BROKER_URL", default=None, metavar="URL",
    help="Redis URL of the cluster [env ORCH_BROKER_URL].")
state_dir_option = click.option(
    "--state-dir", default=None, metavar="DIR", type=click.Path(file_okay=False),
    help="Supervisor's pid, status and worker logs [env ORCH_STATE_DIR; default ~/.local/state/orchestrator].")


def _require_broker(broker: str | None) -> str:
    if not broker:
        raise errors.OrchestratorError(
            "no broker configured: pass --broker redis://[:PASSWORD@]HOST:6379/0 or set ORCH_BROKER_URL")
    return check_redis_url(broker, "broker URL (--broker / ORCH_BROKER_URL)")


def _registry(broker: str) -> redis.Redis:
    url = registry.state_url(broker)
    if url != broker:
        check_redis_url(url, "ORCH_STATE_URL / ORCH_RESULT_BACKEND")
    return registry.client(url)


def _unreachable(broker: str, exc: Exception) -> EnvironmentProblem:
    return EnvironmentProblem(f"cannot reach the broker at {registry.redact(broker)}: {exc}")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f}s ago"


# --- gpus ------------------------------------------------------------------------------

@cli.command()
@cluster_broker_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus(broker: str | None, as_json: bool) -> None:
    """List this host's GPUs (NVML): memory, utilisation, processes, and which worker owns each.

    \b
    Examples:
      orchestrator gpus
      orchestrator gpus --json | jq '.gpus[] | {index, memory_free_mb}'
    Owners are read from the cluster's worker registry when a broker is given.
    """
    inv = gpu.inventory()
    records: list[registry.WorkerRecord] = []
    note = ""
    if broker:
        check_redis_url(broker, "broker URL (--broker / ORCH_BROKER_URL)")
        try:
            records = registry.list_workers(_registry(broker))
        except redis.RedisError as exc:
            note = f"owners unknown: cannot reach the broker at {registry.redact(broker)} ({exc})"
    else:
        note = "owners unknown: give --broker or ORCH_BROKER_URL to see which worker owns each GPU"
    rows = []
    for g in inv.gpus:
        row = g.to_dict()
        row["workers"] = registry.gpu_owners(g.index, records)
        for p in row["processes"]:
            p["worker"] = registry.process_owner(p["pid"], records) if records else None
        rows.append(row)
    if as_json:
        out.print_json(json.dumps({"host": registry.this_host(), "driver": inv.driver,
                                   "driver_version": inv.driver_version, "error": inv.error,
                                   "owners_known": bool(broker) and not note, "gpus": rows}))
        return
    if not inv.driver:
        out.print(f"no NVIDIA driver on {registry.this_host()}: NVML could not be loaded ({inv.error}). "
                  "No GPU can be used here; workers can still train on CPU slots: "
                  "`orchestrator workers up --cpu N`.", markup=False)
        return
    if not inv.gpus:
        out.print(f"NVIDIA driver {inv.driver_version} answered, but it sees no GPU on "
                  f"{registry.this_host()}.", markup=False)
        return
    table = Table(title=f"{registry.this_host()}: {len(inv.gpus)} GPUs, driver {inv.driver_version}",
                  title_justify="left")
    for col in ("gpu", "name", "memory used / total", "free", "util", "processes", "worker"):
        table.add_column(col, overflow="fold")
    for row in rows:
        procs = "\n".join(
            f"{p['pid']} {p['name']}"
            + (f" {p['used_memory_mb']} MiB" if p["used_memory_mb"] is not None else "")
            + (f" ({p['worker']})" if p["worker"] else "") for p in row["processes"]) or "-"
        util = f"{row['utilization_pct']}%" if row["utilization_pct"] is not None else "n/a"
        table.add_row(str(row["index"]), escape(row["name"]),
                      f"{row['memory_used_mb']} / {row['memory_total_mb']} MiB",
                      f"{row['memory_free_mb']} MiB", util, escape(procs),
                      escape(", ".join(row["workers"]) or "-"))
    out.print(table)
    if note:
        err.print(note, markup=False)


# --- workers ---------------------------------------------------------------------------

@cli.group()
def workers() -> None:
    """Start, stop and list workers: one per GPU on this host, every worker in the cluster.

    \b
    Examples:
      orchestrator workers up --gpus 0,2     # one supervised worker per selected GPU
      orchestrator workers list              # every worker of the cluster
      orchestrator workers down              # stop them; running runs go back to their queues
    """


def _select_gpus(spec: str | None, cpu: int, inv: gpu.Inventory) -> list[int]:
    valid = [g.index for g in inv.gpus]
    if spec is None:
        if cpu:  # --cpu alone: CPU workers only
            return []
        if not inv.driver:
            raise errors.OrchestratorError(
                f"no NVIDIA driver on {registry.this_host()} (NVML: {inv.error}): no GPU worker can start. "
                "Start CPU workers instead with --cpu N.")
        if not valid:
            raise errors.OrchestratorError("the NVIDIA driver sees no GPU on this host; start CPU workers with --cpu N")
        return valid
    if spec.strip().lower() == "all":
        chosen = valid
    elif spec.strip().lower() == "none":
        chosen = []
    else:
        chosen = []
        for part in spec.split(","):
            if not part.strip().isdigit():
                raise errors.OrchestratorError(f"--gpus {spec!r}: expected GPU indices like 0,2 (or all), got {part.strip()!r}")
            chosen.append(int(part))
    if not inv.driver and chosen:
        raise errors.OrchestratorError(f"--gpus {spec}: no NVIDIA driver on this host (NVML: {inv.error}); "
                                       "start CPU workers with --cpu N")
    unknown = [i for i in chosen if i not in valid]
    if unknown:
        raise errors.OrchestratorError(f"--gpus {spec}: no GPU {', '.join(map(str, unknown))} on this host; "
                                       f"valid: {', '.join(map(str, valid)) or 'none'} (see `orchestrator gpus`)")
    if len(set(chosen)) != len(chosen):
        raise errors.OrchestratorError(f"--gpus {spec}: a GPU is listed twice; use --per-gpu K for several workers per GPU")
    return chosen


def _wait_started(state: supervisor.StateDir, proc: subprocess.Popen[bytes], n: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = state.read_status()
        if status and status.get("pid") == proc.pid and len(status.get("workers", {})) == n:
            return status
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = state.log.read_text(errors="replace")[-1500:] if state.log.exists() else ""
    raise EnvironmentProblem(f"the worker supervisor did not start (see {state.log}):\n{tail}")


@workers.command()
@click.option("--gpus", "gpus_spec", default=None, metavar="LIST",
              help="GPU indices, e.g. 0,2, or `all` or `none` [default: all GPUs, unless only --cpu is given].")
@click.option("--per-gpu", default=1, show_default=True, type=click.IntRange(min=1), metavar="K",
              help="Workers per GPU (node names gpu<i>-<k>@host).")
@click.option("--cpu", default=0, type=click.IntRange(min=0), metavar="N",
              help="Also start N CPU workers (queue `cpu`); the way to go without GPUs.")
@click.option("--accept-gpu-runs", is_flag=True, help="CPU workers also take runs from the `gpu` queue.")
@click.option("--control", is_flag=True, help="Also start a control worker (chord callbacks).")
@click.option("--exit-when-idle", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Each worker leaves once idle with empty queues for SECONDS; then the supervisor ends.")
@click.option("--return-results", is_flag=True,
              help="This host does not see the results root: the workers return each run's files "
              "through Redis to the control worker (see `orchestrator worker --help`).")
@cluster_broker_option
@results_root_option
@state_dir_option
@click.option("--foreground", is_flag=True, help="Supervise in this process (systemd, batch jobs) instead of detaching.")
@click.option("--wait", "wait_s", default=60.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Wait this long for every worker to register (0: do not wait).")
@click.option("--loglevel", default="INFO", show_default=True)
def up(gpus_spec: str | None, per_gpu: int, cpu: int, accept_gpu_runs: bool, control: bool,
       exit_when_idle: float | None, return_results: bool, broker: str | None, results_root: str | None,
       state_dir: str | None, foreground: bool, wait_s: float, loglevel: str) -> None:
    """Start one supervised worker per GPU of this host (restarted with backoff if it dies).

    \b
    Examples:
      orchestrator workers up                      # every GPU, one worker each
      orchestrator workers up --gpus 0,2 --per-gpu 2
      orchestrator workers up --cpu 4              # a host without GPUs
      orchestrator workers up --return-results     # a host without the shared results root
    Each GPU worker gets CUDA_VISIBLE_DEVICES=<i> and consumes gpu.<host>.<i> and gpu.
    """
    url = _require_broker(broker)
    if return_results and control:
        raise errors.OrchestratorError(
            "--control and --return-results exclude each other: the control worker writes what the "
            "others return under the results root, so start it on a host where that root is mounted")
    transfer.results_transfer()  # bad ORCH_* values: said here, not in each worker's log
    transfer.return_max_bytes()
    # A host that returns its results need not (and often cannot) reach the results root.
    root = results_root_path(results_root, writable=not return_results)
    inv = gpu.inventory(processes=False)
    selected = _select_gpus(gpus_spec, cpu, inv)
    commands = supervisor.worker_commands(selected, per_gpu, cpu, control, accept_gpu_runs, loglevel, exit_when_idle,
                                     return_results)
    if not commands:
        raise errors.OrchestratorError("nothing to start: select GPUs with --gpus, or give --cpu N / --control")
    try:
        registry.client(url).ping()
    except redis.RedisError as exc:
        raise _unreachable(url, exc) from None
    state = supervisor.StateDir(Path(state_dir).resolve() if state_dir else supervisor.default_state_dir())
    running = state.running_pid()
    if running is not None:
        raise errors.OrchestratorError(
            f"a supervisor (pid {running}) already runs workers from {state.path}: stop it with "
            f"`orchestrator workers down --state-dir {state.path}`, or use another --state-dir")
    supervisor.write_plan(state, commands, exit_when_idle is not None)
    env = {**os.environ, "ORCH_BROKER_URL": url, "ORCH_RESULTS_ROOT": str(root)}
    names = {g.index: g.name for g in inv.gpus}
    for c in commands:
        what = f"GPU {c.gpu} ({names[c.gpu]})" if c.gpu is not None else c.label.rstrip("0123456789")
        out.print(f"  {registry.node_name(c.node):<28} {what}", markup=False)
    if foreground:
        code = supervisor.Supervisor(commands, state, env, exit_when_idle=exit_when_idle is not None).run()
        sys.exit(code)
    state.path.mkdir(parents=True, exist_ok=True)
    with open(state.log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "workers", "supervise",
                                 "--state-dir", str(state.path)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _wait_started(state, proc, len(commands))
    out.print(f"supervisor pid {proc.pid} started {_n(len(commands), 'worker')} on {registry.redact(url)}; "
              f"logs in {state.logs}", markup=False)
    if wait_s <= 0:
        return
    expected = {registry.node_name(c.node) for c in commands}
    deadline, started = time.monotonic() + wait_s, time.monotonic()
    client = _registry(url)
    missing = expected
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            missing = expected - {r.name for r in registry.list_workers(client)}
        except redis.RedisError:
            pass
        if not missing:
            out.print(f"{_n(len(expected), 'worker')} registered in {time.monotonic() - started:.1f}s; "
                      "`orchestrator workers list` shows them, `orchestrator workers down` stops them",
                      markup=False)
            return
        time.sleep(0.3)
    raise EnvironmentProblem(f"{', '.join(sorted(missing))} did not register within {wait_s:g}s "
                             f"(the supervisor keeps trying; see the logs in {state.logs})")


@workers.command(hidden=True)
@state_dir_option
def supervise(state_dir: str | None) -> None:
    """Run the supervisor of a plan written by `workers up` (started detached by it)."""
    state = supervisor.StateDir(Path(state_dir).resolve() if state_dir else supervisor.default_state_dir())
    commands, exit_when_idle = supervisor.read_plan(state)
    sys.exit(supervisor.Supervisor(commands, state, dict(os.environ), exit_when_idle=exit_when_idle).run())


def _wait_gone(state: supervisor.StateDir, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.running_pid() is None:
            return True
        time.sleep(0.2)
    return state.running_pid() is None


@workers.command()
@state_dir_option
@click.option("--drain", is_flag=True,
              help="Let each worker finish its current run first (Celery warm shutdown).")
@click.option("--timeout", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop waiting after SECONDS: with --drain, hand running runs back then; "
              "else kill what is left [default: 120, or no limit with --drain].")
def down(state_dir: str | None, drain: bool, timeout: float | None) -> None:
    """Stop the workers `workers up` started on this host.

    By default each worker stops at once and its running run goes back to its queue, for
    another worker (a Celery cold shutdown: nothing is lost, the run starts again). With
    --drain each worker first finishes the run it has and takes no new one.

    \b
    Examples:
      orchestrator workers down
      orchestrator workers down --drain --timeout 3600
    """
    state = supervisor.StateDir(Path(state_dir).resolve() if state_dir else supervisor.default_state_dir())
    pid = state.running_pid()
    if pid == -1:  # locked a moment ago, pid file not written yet
        time.sleep(1)
        pid = state.running_pid()
    if pid is None:
        out.print(f"no worker supervisor is running from {state.path}", markup=False)
        return
    if pid <= 0:
        raise EnvironmentProblem(f"{state.lock} is locked but {state.pid_file} names no process")
    labels = sorted((state.read_status() or {}).get("workers", {}))
    how = "drain: each finishes its current run" if drain else "running runs go back to their queues"
    out.print(f"stopping supervisor {pid} and {_n(len(labels), 'worker')} ({how})", markup=False)
    try:
        os.kill(pid, signal.SIGINT if drain else signal.SIGTERM)
        if drain:
            if _wait_gone(state, timeout if timeout is not None else float("inf")):
                return _report_stopped(state)
            out.print(f"still draining after {timeout:g}s: stopping now, running runs go back to their queues",
                      markup=False)
            os.kill(pid, signal.SIGTERM)
        # The supervisor kills workers 60 s after SIGTERM; this waits a little longer.
        if _wait_gone(state, timeout if timeout is not None and not drain else 120):
            return _report_stopped(state)
    except ProcessLookupError:
        return _report_stopped(state)
    for info in (state.read_status() or {}).get("workers", {}).values():
        if info.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(info["pid"]), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    raise EnvironmentProblem(f"supervisor {pid} did not stop in time; killed it and its workers")


def _report_stopped(state: supervisor.StateDir) -> None:
    final = state.read_status() or {}
    states = {label: w.get("state") for label, w in final.get("workers", {}).items()}
    out.print("stopped: " + (", ".join(f"{k} ({v})" for k, v in sorted(states.items())) or "no workers"),
              markup=False)


@workers.command("list")
@cluster_broker_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(broker: str | None, as_json: bool) -> None:
    """Every live worker of the cluster (from the registry): host, GPU, state, current run.

    \b
    Example:
      orchestrator workers list --json | jq '.[] | select(.state == "idle") | .name'
    A worker that died drops out within three heartbeats (15 s by default).
    """
    url = _require_broker(broker)
    try:
        client = _registry(url)
        records = registry.list_workers(client)
        runs = registry.current_runs(client)
    except redis.RedisError as exc:
        raise _unreachable(url, exc) from None
    rows = []
    for r in records:
        row: dict[str, Any] = {**r.__dict__, "heartbeat_age": round(max(0.0, time.time() - r.heartbeat), 1),
                               "current_runs": runs.get(r.name, [])}
        rows.append(row)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        out.print(f"no live workers registered on {registry.redact(url)}", markup=False)
        return
    table = Table(title=f"{len(rows)} workers on {registry.redact(url)}", title_justify="left")
    table.add_column("worker", no_wrap=True)
    for col in ("host", "gpu", "state", "current run", "last heartbeat", "queues", "pid"):
        table.add_column(col, overflow="fold")
    for row in rows:
        current = "\n".join(str(x.get("name") or x["run_id"]) for x in row["current_runs"]) or "-"
        style = {"busy": "green", "stopping": "yellow"}.get(row["state"])
        table.add_row(escape(row["name"]), escape(row["host"]),
                      str(row["gpu"]) if row["gpu"] is not None else row["device"], row["state"],
                      escape(current), _ago(row["heartbeat"]), escape(",".join(row["queues"])),
                      str(row["pid"]), style=style)
    out.print(table)
