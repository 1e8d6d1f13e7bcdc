"""Every ORCH_* environment variable, declared once: its name, kind, default, valid
values and why. Each is parsed by one rule (`value`), and every entry point (each
`orchestrator` command, and `celeryconfig.py` for a plain `celery -A tasks worker` or
`flower`) checks them all (`check_all`) before it starts or enqueues anything, so a
bad value is refused with exit 2, the variable, its value and what would be valid.

`celeryconfig.py` reads its settings from here; docs/settings.md's table lists the
same names and defaults (a test compares them).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SettingError


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # text, url, path, seconds, number, int, bool, choice, modules, indexes
    default: Any  # the value when unset (None: unset means "not given")
    shown: str  # the default as docs/settings.md shows it
    meaning: str  # what it sets and why its default
    minimum: float | None = None  # numbers: the smallest valid value (inclusive)
    maximum: float | None = None
    above: bool = False  # numbers: strictly above `minimum`
    choices: tuple[str, ...] = ()

    def valid(self) -> str:
        """What a valid value looks like, in words."""
        if self.kind == "bool":
            return "1 or 0 (also true/false, yes/no, on/off)"
        if self.kind == "choice":
            return ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
        if self.kind in ("seconds", "number", "int"):
            what = {"seconds": "a number of seconds", "number": "a number", "int": "a whole number"}[self.kind]
            low = "" if self.minimum is None else f"{'above' if self.above else 'at least'} {self.minimum:g}"
            high = "" if self.maximum is None else f"at most {self.maximum:g}"
            return ", ".join(x for x in (what, " and ".join(x for x in (low, high) if x)) if x)
        if self.kind == "url":
            return "a redis://, rediss:// or unix:// (a Unix socket) URL"
        if self.kind == "modules":
            return "comma-separated Python module names"
        if self.kind == "names":
            return "comma-separated trainer names"
        if self.kind == "indexes":
            return "comma-separated GPU indexes (whole numbers from 0)"
        return "a non-empty text" if self.kind != "path" else "a path"


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(s: Setting, raw: str) -> Any:
    """The value of `raw` for `s`, or SettingError."""
    text = raw.strip()
    if s.kind in ("text", "path"):
        if not text:
            raise ValueError
        return text
    if s.kind == "url":
        if not text.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError
        return text
    if s.kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    if s.kind == "choice":
        if text.lower() not in s.choices:
            raise ValueError
        return text.lower()
    if s.kind == "indexes":
        parts = [p.strip() for p in text.split(",")]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError
        return [int(p) for p in parts]
    if s.kind == "names":
        found = [n.strip() for n in text.split(",") if n.strip()]
        if not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", n) for n in found):
            raise ValueError
        return found
    if s.kind == "modules":
        names = [m.strip() for m in text.split(",") if m.strip()]
        if not all(all(part.isidentifier() for part in m.split(".")) for m in names):
            raise ValueError
        return names
    number: float = int(text) if s.kind == "int" else float(text)
    if not math.isfinite(number):
        raise ValueError
    if s.minimum is not None and (number <= s.minimum if s.above else number < s.minimum):
        raise ValueError
    if s.maximum is not None and number > s.maximum:
        raise ValueError
    return number


def _s(name: str, kind: str, default: Any, shown: str, meaning: str, **rules: Any) -> Setting:
    return Setting(name, kind, default, shown, meaning, **rules)


_SECONDS = {"minimum": 0.0, "above": True}
SETTINGS: dict[str, Setting] = {s.name: s for s in [
    _s("ORCH_BROKER_URL", "url", "redis://127.0.0.1:6379/0", "`redis://127.0.0.1:6379/0`",
       "the broker (also `--broker`): `redis://`, `rediss://` (TLS) or `unix:///path/redis.sock`"),
    _s("ORCH_RESULT_BACKEND", "url", None, "the broker URL", "chord counting and task results (Redis)"),
    _s("ORCH_STATE_URL", "url", None, "the result backend", "live run/group states for progress bars"),
    _s("ORCH_RESULTS_ROOT", "path", "results", "`./results`", "where every file goes (also `--results-root`)"),
    _s("ORCH_RESULTS_TRANSFER", "choice", "shared", "`shared`",
       "on a worker: `shared`, it writes its runs' files under the results root; `return` "
       "(`worker --return-results`), it returns them through Redis and the control worker writes "
       "them (see docs/deployment.md: hosts without the shared results root)", choices=("shared", "return")),
    _s("ORCH_RETURN_MAX_MB", "number", 32.0, "`32`",
       "largest compressed archive of one fold's files a return-mode worker may send, in MiB; the "
       "control worker refuses larger ones and ones that inflate past 8 times it (why 32: "
       "`celeryconfig.py`)", minimum=0.0, above=True, maximum=512.0),
    _s("ORCH_DATASET_MAX_MB", "number", 1024.0, "`1024`",
       "largest CSV dataset a worker or `submit` reads, in MiB; a larger file, and a path that is "
       "not a regular file (a FIFO, a device, a socket), is refused at once (docs/security.md)",
       minimum=0.0, above=True, maximum=1048576.0),
    _s("ORCH_SCRATCH_DIR", "path", None, "the system's temporary folder",
       "where a return-mode worker trains (a folder per run, always removed)"),
    _s("ORCH_VISIBILITY_TIMEOUT", "seconds", 12 * 3600.0, "`43200` (12 h)",
       "must exceed your longest run; see `celeryconfig.py`", **_SECONDS),
    _s("ORCH_RESULT_EXPIRES", "seconds", 7 * 24 * 3600.0, "`604800` (7 d)",
       "result and chord-counter lifetime", **_SECONDS),
    _s("ORCH_TRAINER_MODULES", "modules", [], "empty", "extra modules whose trainers (`TRAINERS`, `TRAINER` or `@orch.trainer` functions) a worker registers; one that cannot be imported stops the worker at its start"),
    _s("ORCH_FSYNC", "bool", True, "`1`",
       "fsync each final record (outputs, DONE/FAILED marks, ensemble, CSV) before its rename, so it "
       "survives a host crash; transient IN_PROGRESS/PENDING marks are never fsynced (losing one only "
       "re-runs the run)"),
    _s("ORCH_TORCH_THREADS", "int", 1, "`1`", "torch CPU threads per worker process", minimum=1, maximum=1024),
    _s("ORCH_PRELOAD", "bool", False, "`1` on training workers",
       "import trainer dependencies when a pool process starts"),
    _s("ORCH_PRELOAD_TRAINERS", "names", None, "every registered trainer",
       "with `ORCH_PRELOAD`: preload only these trainers (comma-separated names); `orchestrator run` "
       "sets it to the trainers of its experiments, so a sweep of `prior` starts no `import torch`"),
    _s("ORCH_LEASE_SECONDS", "seconds", 10.0, "`10`",
       "a run's lease lives this long without a heartbeat (renewed every quarter of it); a lost "
       "worker's run is handed on after at most this plus one watchdog interval", minimum=0.2, maximum=3600.0),
    _s("ORCH_WATCHDOG_INTERVAL", "seconds", 2.0, "`2`",
       "how often the watchdog in control workers looks for lapsed leases, orphaned deliveries and "
       "lost Redis data", minimum=0.05, maximum=3600.0),
    _s("ORCH_EVENT_FLUSH_INTERVAL", "seconds", 0.05, "`0.05`",
       "a worker publishes its task events (for Flower, `celery events`) in one message at most this "
       "many seconds after the first of them; `0` is Celery's own cadence, about one publish per event "
       "(`tasks/overhead.py`)", minimum=0.0),
    _s("ORCH_PROGRESS_INTERVAL", "seconds", 1.0, "`1`",
       "at most one progress write to Redis per run this often, however fast a trainer reports; the "
       "first once the run has trained this long (shorter runs send none)", minimum=0.05, maximum=3600.0),
    _s("ORCH_DEFAULT_GPU_MEMORY_GB", "number", 4.0, "`4`",
       "free GPU memory a run needs when it does not say (`resources.gpu_memory_gb`)", minimum=0.0),
    _s("ORCH_WORKER_HEARTBEAT", "seconds", 5.0, "`5`",
       "seconds between a worker's registry heartbeats (`workers list`); its key expires after 3",
       minimum=0.0, above=True, maximum=3600.0),
    _s("ORCH_GANG_JOIN_SECONDS", "seconds", 30.0, "`30`",
       "how long the ranks of a data-parallel run wait for all of theirs to join; then the gang's "
       "slot reservation is released and the run tried again later (docs/data-parallel.md)",
       minimum=1.0, maximum=3600.0),
    _s("ORCH_GANG_RETRY_SECONDS", "seconds", 3.0, "`3`",
       "how soon a data-parallel run that could not reserve its workers tries again",
       minimum=0.1, maximum=3600.0),
    _s("ORCH_GANG_LEASE_SECONDS", "seconds", 5.0, "`5`",
       "a rank's lease lives this long without a heartbeat (renewed every fifth of it); its "
       "peers stop when one lapses", minimum=1.0, maximum=600.0),
    _s("ORCH_GANG_COLLECTIVE_TIMEOUT", "seconds", 10.0, "`10`",
       "torch.distributed timeout of one collective (all-reduce) of a data-parallel run: a rank "
       "stuck behind a paused peer gives up after this", minimum=1.0, maximum=3600.0),
    _s("ORCH_CHECKPOINT_EVERY", "int", 5, "`5`",
       "a data-parallel run saves a checkpoint every this many epochs (rank 0), and a relaunch "
       "resumes from the last one", minimum=1, maximum=1_000_000),
    _s("ORCH_STATE_DIR", "path", None, "`~/.local/state/orchestrator`",
       "supervisor state of `workers up` (pid, status, logs)"),
    _s("ORCH_EXIT_WHEN_IDLE", "seconds", None, "set by `worker --exit-when-idle`",
       "seconds with nothing to do before a worker exits", **_SECONDS),
    _s("ORCH_DEVICE", "choice", None, "set by `orchestrator worker`",
       "`cuda` or `cpu`; a plain `celery worker` without it trains on `cuda` when "
       "`CUDA_VISIBLE_DEVICES` is set and non-empty, else on the CPU", choices=("cuda", "cpu")),
    _s("ORCH_GPU", "indexes", None, "set by `orchestrator worker --gpu`",
       "the GPU indexes (comma-separated) a GPU worker owns"),
    _s("ORCH_POOL_START_METHOD", "choice", "fork", "`fork`",
       "how a worker starts its pool processes; CUDA is only initialised in the child that trains",
       choices=("fork", "spawn", "forkserver")),
    _s("ORCH_NVML_MODULE", "text", None, "`pynvml`",
       "the module GPU detection imports (tests put a fake NVML here)"),
    _s("ORCH_KEEP_LOCAL_LOGS", "bool", False, "`0`",
       "keep local mode's worker logs and Redis folder after `orchestrator run` (for debugging)"),
    _s("ORCH_FLOWER_USER", "text", None, "none", "Flower's basic-auth user (`orchestrator flower`)"),
    _s("ORCH_FLOWER_PASSWORD", "text", None, "none", "Flower's basic-auth password"),
]}


def value(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The setting's value from `env` (default os.environ) by its one rule: its default
    when unset or empty (or, for those without one, None); SettingError when not valid."""
    s = SETTINGS[name]
    raw = (os.environ if env is None else env).get(name)
    if raw is None or not raw.strip():  # empty is unset (VAR= in a unit file or a shell)
        return s.default
    try:
        return _parse(s, raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not valid: give {s.valid()}") from None


def check_all(env: Mapping[str, str] | None = None) -> None:
    """Every declared setting that is set, parsed: one SettingError naming each bad one."""
    problems = []
    for name in SETTINGS:
        try:
            value(name, env)
        except SettingError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingError("; ".join(problems) if len(problems) == 1 else
                           f"{len(problems)} settings are not valid:\n  - " + "\n  - ".join(problems))


def refuse_and_exit(check: Callable[[], None] = check_all) -> None:
    """For entry points that are not the CLI (celeryconfig.py, read by a plain `celery`
    command): a bad setting ends the process with exit 2 and the message, no traceback."""
    import sys

    try:
        check()
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
