"""Packing a fold's files for return through Redis, and unpacking them as untrusted
input (orchestrator.execution.transfer): no broker, no workers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import SettingError
from orchestrator.execution.transfer import (
    FORMAT,
    RAW_FACTOR,
    BadPayload,
    PayloadTooLarge,
    pack,
    results_transfer,
    return_max_bytes,
    unpack,
)
from orchestrator.paths import FOLD_FILES

LIMIT = 64 * 1024


@pytest.fixture
def fold(tmp_path: Path) -> Path:
    folder = tmp_path / "fold_0"
    folder.mkdir()
    for name in FOLD_FILES:
        (folder / name).write_text(f"index,split,a\n{name},val,0.25\n" * 20)
    (folder / "metadata.json").write_text(json.dumps({"metrics": {"accuracy": 1.0}, "note": "é ü"}))
    return folder


def _forge(content: Any, **fields: Any) -> dict[str, Any]:
    """An archive built by hand, with valid data, sizes and digest unless overridden."""
    blob = zlib.compress(json.dumps(content).encode())
    sizes = {k: len(str(v).encode()) for k, v in content.items()} if isinstance(content, dict) else {}
    return {"format": FORMAT, "files": sizes, "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), "data": base64.b64encode(blob).decode(), **fields}


def test_round_trip_gives_back_every_byte(fold: Path) -> None:
    payload = pack(fold, FOLD_FILES, LIMIT, "exp/iris/base/seed=0/fold=0", run_id="abc")
    wire = json.dumps(payload)  # what crosses Redis: JSON text
    files = unpack(wire, FOLD_FILES, LIMIT)
    assert files == {name: (fold / name).read_bytes() for name in FOLD_FILES}
    assert payload["files"] == {name: (fold / name).stat().st_size for name in FOLD_FILES}
    assert payload["run_id"] == "abc" and payload["bytes"] < sum(payload["files"].values())


def test_outputs_over_the_limit_name_the_run_the_size_the_limit_and_the_ways_out(fold: Path) -> None:
    (fold / "ranks.csv").write_bytes(base64.b64encode(os.urandom(20000)))  # incompressible
    with pytest.raises(PayloadTooLarge) as info:
        pack(fold, FOLD_FILES, 16 * 1024, "exp/iris/base/seed=0/fold=3")
    text = str(info.value)
    assert text.startswith("exp/iris/base/seed=0/fold=3: its outputs are ")
    assert "KiB compressed, over the limit of 16.0 KiB compressed" in text
    assert "ORCH_RETURN_MAX_MB" in text and "shared results root" in text


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b.csv", "..", "a\\b", "evil.csv", ""])
def test_file_names_that_are_not_the_expected_plain_names_are_refused(name: str) -> None:
    content = {n: "x\n" for n in FOLD_FILES[:-1]} | {name: "x\n"}
    with pytest.raises(BadPayload, match="file|lacks"):
        unpack(_forge(content), FOLD_FILES, LIMIT)


def test_a_missing_file_is_refused() -> None:
    with pytest.raises(BadPayload, match="lacks"):
        unpack(_forge({n: "x\n" for n in FOLD_FILES[:2]}), FOLD_FILES, LIMIT)


def test_a_decompression_bomb_is_refused_before_it_inflates() -> None:
    content = {n: "" for n in FOLD_FILES} | {"ranks.csv": "0" * (LIMIT * RAW_FACTOR + 10)}
    payload = _forge(content)
    assert payload["bytes"] < LIMIT // 10  # small on the wire
    with pytest.raises(BadPayload, match="decompression bomb"):
        unpack(payload, FOLD_FILES, LIMIT)


def test_an_archive_over_the_limit_is_refused_before_decoding(fold: Path) -> None:
    payload = pack(fold, FOLD_FILES, LIMIT, "r")
    with pytest.raises(BadPayload, match="over the limit"):
        unpack(payload, FOLD_FILES, payload["bytes"] - 1)


@pytest.mark.parametrize(("wire", "message"), [
    (b"\x80\x04\x95pickle", "not JSON"),
    ("[1, 2]", "not a JSON object of format"),
    (json.dumps({"format": "tar"}), "not a JSON object of format"),
])
def test_non_json_and_foreign_archives_are_refused(wire: Any, message: str) -> None:
    with pytest.raises(BadPayload, match=message):
        unpack(wire, FOLD_FILES, LIMIT)


def test_altered_data_sizes_or_content_are_refused(fold: Path) -> None:
    good = pack(fold, FOLD_FILES, LIMIT, "r")
    other = pack(fold, FOLD_FILES[:3] + ("metadata.json",), LIMIT, "r")
    with pytest.raises(BadPayload, match="sha256"):
        unpack({**good, "sha256": "0" * 64}, FOLD_FILES, LIMIT)
    with pytest.raises(BadPayload, match="base64"):
        unpack({**good, "data": good["data"][:-3] + "!!!"}, FOLD_FILES, LIMIT)
    with pytest.raises(BadPayload, match="sizes"):
        unpack({**good, "files": {**good["files"], "ranks.csv": 1}}, FOLD_FILES, LIMIT)
    with pytest.raises(BadPayload, match="JSON"):
        blob = zlib.compress(b"not json")
        unpack({**good, "data": base64.b64encode(blob).decode(), "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest()}, FOLD_FILES, LIMIT)
    with pytest.raises(BadPayload, match="other than text"):
        unpack(_forge({n: 1 for n in FOLD_FILES}, files={n: 1 for n in FOLD_FILES}), FOLD_FILES, LIMIT)
    assert unpack(other, FOLD_FILES, LIMIT)  # the same names: fine


@pytest.mark.parametrize(("env", "ok"), [
    ({}, "shared"), ({"ORCH_RESULTS_TRANSFER": "return"}, "return"), ({"ORCH_RESULTS_TRANSFER": " Shared "}, "shared"),
    ({"ORCH_RESULTS_TRANSFER": "nfs"}, None),
])
def test_the_transfer_setting(env: dict[str, str], ok: str | None) -> None:
    if ok is None:
        with pytest.raises(SettingError, match="ORCH_RESULTS_TRANSFER='nfs' is not valid: give shared"):
            results_transfer(env)
    else:
        assert results_transfer(env) == ok


def test_the_size_limit_setting() -> None:
    assert return_max_bytes({}) == 32 * 1024 * 1024
    assert return_max_bytes({"ORCH_RETURN_MAX_MB": "0.5"}) == 512 * 1024
    for bad in ("0", "-1", "lots", "nan", "1e9"):
        with pytest.raises(SettingError, match=f"ORCH_RETURN_MAX_MB='{bad}' is not valid"):
            return_max_bytes({"ORCH_RETURN_MAX_MB": bad})
