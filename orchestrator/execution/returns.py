"""Return mode (ORCH_RESULTS_TRANSFER=return): a worker that cannot see the results root
trains into a private scratch folder and hands a fold back through Redis; the control
worker writes it under the root. The shared-root path is orchestrator.execution.runner.SharedSink.

Keys (under `orch:`, keyed by RunSpec.run_key like the leases):

    fold:<run_key>     JSON: the fold's status record, exactly what the worker would have
                       written to status/fold_<i>.json (IN_PROGRESS with its attempt
                       history, DONE with file sizes, FAILED with the error, ...)
    return:<run_key>   JSON: the fold's files packed by orchestrator.execution.transfer, stored only
                       by the attempt holding the run's lease, and only if no other
                       attempt's archive waits there (the first attempt to finish wins)

Both expire with the chord (ORCH_RESULT_EXPIRES). The control side (`collect`, run by
`finalize` and by the group's error callback) verifies each waiting archive, stages and
renames its files into fold_<i>/ as a worker would, writes fold_<i>.json, and deletes
the archive; status marks of folds that did not finish are copied to their files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import redis

from .. import keys
from ..collect.status import Status, file_sizes, fold_state, write_fold_status
from ..errors import RunStopped
from ..experiment.spec import RunSpec
from ..livestate import TTL_SECONDS
from ..paths import FOLD_FILES, Layout, atomic_write_json, file_lock, fsync_dir
from . import transfer
from .runner import Guard, commit_folder, end_attempt, move_aside, write_new

log = logging.getLogger(__name__)




# KEYS: lease, payload. ARGV: token ('' = no lease to check), payload, ttl.
# 1 stored; 0 the lease belongs to another attempt (fenced); 2 another archive waits.
_PUT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""


def _decode(raw: Any, spec: RunSpec) -> dict[str, Any] | None:
    try:
        data = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") == spec.run_id else None


class Returns:
    """The two keys of each run, on one Redis client."""

    def __init__(self, client: redis.Redis, ttl: float = TTL_SECONDS):
        self.client, self.ttl = client, max(1, int(ttl))
        self._put = client.register_script(_PUT)

    def record(self, spec: RunSpec) -> dict[str, Any] | None:
        return _decode(self.client.get(keys.fold_record(spec.run_key)), spec)

    def write_record(self, spec: RunSpec, record: dict[str, Any]) -> None:
        self.client.set(keys.fold_record(spec.run_key), json.dumps(record, default=str), ex=self.ttl)

    def records(self, specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
        """run_key -> record, with whether an archive waits (`"returned": True`), in one
        round trip."""
        if not specs:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for spec in specs:
            pipe.get(keys.fold_record(spec.run_key))
            pipe.exists(keys.return_payload(spec.run_key))
        replies = pipe.execute()
        found = {}
        for i, spec in enumerate(specs):
            record = _decode(replies[2 * i], spec)
            if record is not None or replies[2 * i + 1]:
                found[spec.run_key] = {**(record or {}), "returned": bool(replies[2 * i + 1])}
        return found

    def put(self, spec: RunSpec, payload: dict[str, Any], token: str | None) -> int:
        """Store the archive (1) if `token` still holds the lease (else 0) and no other
        archive waits (else 2)."""
        return int(cast(int, self._put(keys=[keys.lease(spec.run_key), keys.return_payload(spec.run_key)],
                                       args=[token or "", json.dumps(payload), self.ttl])))

    def payload(self, spec: RunSpec) -> bytes | None:
        return cast(bytes | None, self.client.get(keys.return_payload(spec.run_key)))

    def drop(self, spec: RunSpec) -> None:
        self.client.delete(keys.return_payload(spec.run_key))


class ReturnSink:
    """A worker without the results root: status marks to Redis, outputs into a private
    scratch folder, committed by returning them. One per task; `cleanup()` removes the
    scratch folder."""

    def __init__(self, returns: Returns, max_bytes: int, scratch_parent: str | None = None):
        self.returns, self.max_bytes = returns, max_bytes
        self.scratch_parent = scratch_parent
        self._scratch: Path | None = None

    @property
    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="orch-return-", dir=self.scratch_parent))
        return self._scratch

    def cleanup(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def fold_state(self, spec: RunSpec, submitted_at: float | None = None) -> tuple[str, dict[str, Any]]:
        """DONE when an archive of this run waits for the control worker, or (for a
        delivery submitted at `submitted_at`) when an attempt finished after that: the
        control worker wrote it, or will. A DONE record from before the submission means
        the results root lost the fold (the plan sent it again): run it."""
        entry = self.returns.records([spec]).get(spec.run_key, {"returned": False})
        record = {k: v for k, v in entry.items() if k != "returned"}
        status = str(record.get("status") or "NEW")
        if entry["returned"]:  # (its mark may still say IN_PROGRESS: the worker died between)
            return Status.DONE.value, {**record, "status": Status.DONE.value}
        if status == Status.DONE.value:
            finished = float(record.get("finished_at") or 0)
            fresh = submitted_at is not None and finished > submitted_at
            return (Status.DONE.value if fresh else "NEW"), record
        return status, record

    def read_status(self, spec: RunSpec) -> dict[str, Any] | None:
        return self.returns.record(spec)

    def write_status(self, spec: RunSpec, status: Status, base: dict[str, Any] | None = None,
                     **fields: Any) -> dict[str, Any]:
        previous = base if base is not None else (self.returns.record(spec) or {})
        record = {**previous, "run_id": spec.run_id, "name": spec.name, "fold": spec.fold,
                  "status": status.value, "updated_at": time.time(), "transfer": transfer.RETURN,
                  **fields}
        self.returns.write_record(spec, record)
        return record

    def staging_dir(self, spec: RunSpec, tag: str) -> Path:
        return self.scratch / f"fold_{spec.fold}.{tag}"

    def prepare(self, spec: RunSpec, guard: Guard, record: dict[str, Any]) -> dict[str, Any] | None:
        return None  # a fresh scratch folder per task: nothing left over to clear

    def commit(self, spec: RunSpec, staging: Path, guard: Guard) -> dict[str, int]:
        payload = transfer.pack(staging, FOLD_FILES, self.max_bytes, spec.name, run_id=spec.run_id)
        code = self.returns.put(spec, payload, getattr(guard, "token", None))
        if code == 0:
            raise RunStopped("its lease was handed to another attempt")
        if code == 2:
            raise RunStopped("another attempt returned this run's outputs first")
        shutil.rmtree(staging, ignore_errors=True)
        return cast(dict[str, int], payload["files"])

    def summary(self, spec: RunSpec, record: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": spec.run_id, "name": spec.name, "status": Status.DONE.value,
                "metrics": record.get("metrics", {}), "worker": record.get("worker")}

    def run_log(self, spec: RunSpec, attempt: int) -> Path:
        """Its tail reaches Redis when the attempt ends (runlogs.publish_tail)."""
        return self.scratch / f"fold_{spec.fold}.attempt_{attempt}.log"


# --- the control side -------------------------------------------------------------------

def collect(layout: Layout, specs: list[RunSpec], returns: Returns, max_bytes: int,
            states: list[tuple[str, dict[str, Any]]] | None = None) -> list[str]:
    """Bring under the results root what return-mode workers left in Redis for these
    folds (one group): archives become fold_<i>/ and a DONE fold_<i>.json; newer status
    marks of unfinished folds are copied. Idempotent. Nothing to do (the shared-root
    case) costs no Redis call when every fold is DONE on disk. `states`: each fold's
    status.fold_state (in the order of `specs`) if the caller has just read them. Returns
    what it did: nothing written under the root when it returns no note."""
    if states is None:
        states = [fold_state(layout, s) for s in specs]
    if not specs or all(state == Status.DONE.value for state, _ in states):
        return []
    if not returns.records(specs):
        return []
    notes: list[str] = []
    with file_lock(layout.status_dir(specs[0]) / ".collect.lock"):  # one collect at a time
        found = returns.records(specs)
        for spec in specs:
            entry = found.get(spec.run_key)
            if entry is None:
                continue
            record = {k: v for k, v in entry.items() if k != "returned"}
            if entry["returned"]:
                notes.append(_take(layout, spec, returns, record, max_bytes))
            elif (note := _copy_mark(layout, spec, record)) is not None:
                notes.append(note)
    for note in notes:
        log.info("collect: %s", note)
    return notes


def _take(layout: Layout, spec: RunSpec, returns: Returns, record: dict[str, Any],
          max_bytes: int) -> str:
    """Verify a waiting archive and commit it (or reject it); the archive is dropped."""
    raw = returns.payload(spec)
    if raw is None:
        return f"{spec.name}: its archive was taken meanwhile"
    state, disk = fold_state(layout, spec)
    try:
        files = transfer.unpack(raw, FOLD_FILES, max_bytes)
    except transfer.BadPayload as exc:
        returns.drop(spec)
        if state == Status.DONE.value:
            return f"{spec.name}: dropped an invalid late archive ({exc}); the fold was already written"
        error = f"BadPayload: the outputs returned by its worker were refused: {exc}"
        write_fold_status(layout, spec, Status.FAILED, base=record or disk or None, error=error,
                          finished_at=time.time())
        return f"{spec.name}: FAILED, {error}"
    if state == Status.DONE.value:  # a late duplicate: never overwrites what was committed
        paths = layout.fold_files(spec)
        same = all(paths[n].read_bytes() == data for n, data in files.items())
        returns.drop(spec)
        return (f"{spec.name}: dropped a late archive "
                + ("identical to the fold already written" if same else
                   "that differs from the fold already written (kept the first)"))
    staging = layout.staging_dir(spec, f"returned-{uuid.uuid4().hex}")
    # Not DONE on disk, yet a folder of this run is there: a collect that died between
    # its rename and its DONE mark, or damaged files. Under the collect lock: replaced.
    move_aside(layout.fold_dir(spec), staging.with_name(staging.name + ".old"))
    try:
        staging.mkdir(parents=True)
        for name, data in files.items():
            write_new(staging / name, data)
        fsync_dir(staging)
        commit_folder(staging, layout.fold_dir(spec), spec.run_id)
    except RunStopped:  # a shared-root worker committed this fold in the meantime
        shutil.rmtree(staging, ignore_errors=True)
        returns.drop(spec)
        return f"{spec.name}: dropped its archive, another attempt wrote the fold first"
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sizes = file_sizes(layout.fold_files(spec))
    base = record or disk
    metrics = base.get("metrics")
    if metrics is None:  # its worker stopped between returning and its DONE mark
        with contextlib.suppress(ValueError, AttributeError):
            metrics = json.loads(files["metadata.json"]).get("metrics")
    finished = float(base.get("finished_at") or time.time())
    write_fold_status(layout, spec, Status.DONE, base=base, files=sizes, error=None,
                      finished_at=finished, metrics=metrics,
                      history=end_attempt(base, Status.DONE.value, finished),
                      returned={"bytes": len(raw), "collected_at": time.time()})
    returns.drop(spec)
    return f"{spec.name}: wrote its returned outputs ({sum(sizes.values())} bytes)"


def _copy_mark(layout: Layout, spec: RunSpec, record: dict[str, Any]) -> str | None:
    """A status mark newer than the fold's file, of a fold that is not DONE on disk,
    becomes its file (a DONE mark without its archive cannot: its files are gone)."""
    status = record.get("status")
    valid = {s.value for s in Status}
    state, disk = fold_state(layout, spec)
    if state == Status.DONE.value or status not in valid:
        return None
    if float(record.get("updated_at") or 0) <= float(disk.get("updated_at") or 0):
        return None
    if status == Status.DONE.value:
        write_fold_status(layout, spec, Status.FAILED, base=record, finished_at=time.time(),
                          error="its worker returned its outputs, but they expired from Redis before "
                                "the control worker wrote them (ORCH_RESULT_EXPIRES)")
        return f"{spec.name}: FAILED, its returned outputs expired"
    data = {**record, "run_id": spec.run_id, "name": spec.name, "fold": spec.fold}
    atomic_write_json(layout.fold_status(spec), data, durable=Status(status).final)
    return f"{spec.name}: {status} mark written"
