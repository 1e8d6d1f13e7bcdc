"""How a worker without the shared results root hands a fold's files back: settings,
packing and (on the control side) unpacking of one JSON-safe archive. Plain Python.

An archive is a JSON object: the fold's files as one zlib-compressed JSON object
{file name: text}, base64-encoded, with the sizes and a SHA-256 of what was compressed.
It crosses Redis, so the side that unpacks it trusts nothing in it: JSON only (never
pickle), exactly the expected file names (no path separators, no `..`), the compressed
size bounded before decoding, the decompressed size bounded while decompressing (a
small archive cannot inflate into gigabytes), every size and the digest checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import settings

SHARED, RETURN = "shared", "return"
# What `orchestrator status` shows for a fold that a return-mode worker finished and
# whose files wait in Redis until the control worker writes them (at its group's end).
RETURNED = "RETURNED"
FORMAT = "orch-fold-files/1"
DEFAULT_MAX_MB = 32.0
# Outputs a worker returns may inflate at most this much when decompressed: CSVs of
# probabilities compress 3-6x; what inflates more is not a fold's outputs.
RAW_FACTOR = 8
MIB = 1024 * 1024


class TransferError(Exception):
    """A fold's files could not be handed back (base of the two below)."""


class PayloadTooLarge(TransferError):
    """A worker's fold outputs exceed what may be returned through Redis."""


class BadPayload(TransferError):
    """A returned archive that is not what a worker of this project packs."""


def results_transfer(env: Mapping[str, str] | None = None) -> str:
    """ORCH_RESULTS_TRANSFER: `shared` (default; the worker writes under the results
    root) or `return` (it hands its outputs back through Redis)."""
    return str(settings.value("ORCH_RESULTS_TRANSFER", env))


def return_max_bytes(env: Mapping[str, str] | None = None) -> int:
    """ORCH_RETURN_MAX_MB (MiB, fractions allowed; default 32) in bytes: the largest
    compressed archive of one fold that may be returned."""
    return max(1024, int(float(settings.value("ORCH_RETURN_MAX_MB", env)) * MIB))


def mib(size: int) -> str:
    """A size for people: MiB, KiB or bytes."""
    if size >= MIB:
        return f"{size / MIB:.2f} MiB"
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} bytes"


def too_large(run: str, what: str, size: int, limit: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{run}: its outputs are {mib(size)} {what}, over the limit of {mib(limit)} {what} for "
        f"results returned through Redis (ORCH_RETURN_MAX_MB={max_bytes / MIB:.4g}). Either run this "
        "worker where the shared results root is mounted (without --return-results, "
        "ORCH_RESULTS_TRANSFER=shared), or raise ORCH_RETURN_MAX_MB on the workers and the "
        "control worker")


def pack(folder: Path, names: tuple[str, ...], max_bytes: int, run: str,
         **info: Any) -> dict[str, Any]:
    """The files `names` of `folder` as one archive (a JSON-safe dict), or
    PayloadTooLarge naming the run, the size and the limit."""
    files = {name: (folder / name).read_bytes() for name in names}
    raw_size = sum(len(v) for v in files.values())
    if raw_size > max_bytes * RAW_FACTOR:
        raise too_large(run, "uncompressed", raw_size, max_bytes * RAW_FACTOR, max_bytes)
    try:
        text = {name: data.decode("utf-8") for name, data in files.items()}
    except UnicodeDecodeError as exc:
        raise TransferError(f"{run}: an output file is not UTF-8 text ({exc})") from None
    blob = zlib.compress(json.dumps(text, sort_keys=True).encode(), 6)
    if len(blob) > max_bytes:
        raise too_large(run, "compressed", len(blob), max_bytes, max_bytes)
    return {"format": FORMAT, "files": {name: len(data) for name, data in files.items()},
            "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "data": base64.b64encode(blob).decode("ascii"), "packed_at": time.time(), **info}


def _check_names(found: Any, names: tuple[str, ...], what: str) -> None:
    if not isinstance(found, dict):
        raise BadPayload(f"{what} is not a JSON object")
    for name in found:
        if (not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name
                or name in (".", "..") or ".." in name or os.path.isabs(name)):
            raise BadPayload(f"{what} names a file {name!r} that is not a plain file name")
    if set(found) != set(names):
        unexpected = sorted(set(found) - set(names))
        missing = sorted(set(names) - set(found))
        raise BadPayload(f"{what} has unexpected files {unexpected} or lacks {missing}; "
                         f"expected exactly {list(names)}")


def unpack(payload: Any, names: tuple[str, ...], max_bytes: int) -> dict[str, bytes]:
    """The files of an archive `pack` made, verified; BadPayload (saying what is wrong)
    for anything else. `payload` is the parsed JSON or its text; never unpickled."""
    if isinstance(payload, (str, bytes)):
        if len(payload) > max_bytes * 2:  # base64 plus the small fields
            raise BadPayload(f"archive of {mib(len(payload))} is over the limit of {mib(max_bytes)}")
        try:
            payload = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise BadPayload("archive is not JSON") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadPayload(f"archive is not a JSON object of format {FORMAT!r}")
    sizes, data, digest, size = (payload.get(k) for k in ("files", "data", "sha256", "bytes"))
    _check_names(sizes, names, "archive's file list")
    assert isinstance(sizes, dict)
    if not all(type(v) is int and v >= 0 for v in sizes.values()):
        raise BadPayload("archive's file sizes are not whole numbers")
    if not isinstance(data, str) or not isinstance(digest, str) or type(size) is not int:
        raise BadPayload("archive lacks its data, sha256 or bytes")
    if size > max_bytes or len(data) > 4 * (max_bytes + 2) // 3 + 4:
        raise BadPayload(f"archive of {mib(max(size, len(data) * 3 // 4))} is over the limit of "
                         f"{mib(max_bytes)} (ORCH_RETURN_MAX_MB on the control worker)")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadPayload("archive data is not base64") from None
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != digest:
        raise BadPayload("archive data does not match its size and sha256 (damaged or altered)")
    limit = max_bytes * RAW_FACTOR
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, limit + 1)
    except zlib.error as exc:
        raise BadPayload(f"archive data is not zlib-compressed ({exc})") from None
    if len(raw) > limit or inflater.unconsumed_tail:
        raise BadPayload(f"archive inflates beyond {mib(limit)} ({RAW_FACTOR} times the limit): "
                         "refused as a decompression bomb")
    if not inflater.eof:
        raise BadPayload("archive data is truncated")
    try:
        text = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadPayload("archive content is not JSON") from None
    _check_names(text, names, "archive content")
    if not all(isinstance(v, str) for v in text.values()):
        raise BadPayload("archive content holds something other than text files")
    files = {name: value.encode("utf-8") for name, value in text.items()}
    wrong = [n for n, v in files.items() if len(v) != sizes[n]]
    if wrong:
        raise BadPayload(f"archive files {wrong} do not have the sizes its file list gives")
    return files
