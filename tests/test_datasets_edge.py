"""Only regular files are read as datasets (issue 22): a CSV path from a broker message
that names a FIFO, a device, a socket or a folder is refused at once, checked on the
opened file; a file over ORCH_DATASET_MAX_MB is refused before it is read."""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

import pytest

from orchestrator.errors import DatasetError
from orchestrator.execution.deadletters import DeadLetters
from orchestrator.experiment import datasets
from orchestrator.experiment.spec import DatasetRef, RunSpec
from orchestrator.paths import Layout

from .conftest import Cluster, celery_app, run_cli, wait_for


def _csv(path: Path, rows: int = 30) -> Path:
    path.write_text("f1,f2,label\n" + "".join(f"{i},{i * 3 % 7},{'ab'[i % 2]}\n" for i in range(rows)))
    return path


def _ref(path: Path, sha: str = "0" * 64) -> DatasetRef:
    return DatasetRef(name="d", source="csv", path=str(path), target="label", sha256=sha)


def _refused_at_once(path: Path, words: str) -> None:
    started = time.monotonic()
    with pytest.raises(DatasetError, match=words):
        datasets.load(_ref(path))
    with pytest.raises(DatasetError, match=words):
        datasets.file_sha256(path)  # what validating a config reads
    assert time.monotonic() - started < 2.0


def test_a_fifo_without_a_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    _refused_at_once(fifo, r"named pipe \(FIFO\), not a regular file")
    # Nothing kept it open: a non-blocking writer finds no reader.
    with pytest.raises(OSError) as info:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO


def test_a_device_is_refused_even_through_a_symlink(tmp_path: Path) -> None:
    link = tmp_path / "zero.csv"
    link.symlink_to("/dev/zero")  # the name says .csv; the opened file is a device
    _refused_at_once(link, "character device, not a regular file")


def test_a_socket_and_a_folder_are_refused(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.csv"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        server.listen(1)
        _refused_at_once(sock_path, "is a socket, not a regular file")
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    _refused_at_once(folder, "is a folder, not a regular file")


def test_an_oversize_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _csv(tmp_path / "big.csv", rows=400)  # ~5 KB
    sha = datasets.file_sha256(big)
    assert datasets.load(_ref(big, sha)).X.shape == (400, 2)
    monkeypatch.setenv("ORCH_DATASET_MAX_MB", "0.001")  # 1048 bytes
    _refused_at_once(big, r"is [0-9]+ bytes, over the limit of 1048 bytes for a dataset \(ORCH_DATASET_MAX_MB\)")
    monkeypatch.setenv("ORCH_DATASET_MAX_MB", "-1")
    from orchestrator.errors import SettingError

    with pytest.raises(SettingError, match="ORCH_DATASET_MAX_MB='-1' is not valid"):
        datasets.max_bytes()


def test_a_regular_file_is_read_once_and_checked_against_its_hash(tmp_path: Path) -> None:
    path = _csv(tmp_path / "ok.csv")
    sha = datasets.file_sha256(path)
    table = datasets.load(_ref(path, sha))
    assert table.X.shape == (30, 2) and table.classes == ("a", "b")
    assert datasets.load(_ref(path, sha)) is table  # parsed once per file version
    with pytest.raises(DatasetError, match="changed since the experiment was submitted"):
        datasets.load(_ref(path, "f" * 64))
    path.write_bytes(path.read_bytes() + b"99,1,a\n")
    with pytest.raises(DatasetError, match="changed since the experiment was submitted"):
        datasets.load(_ref(path, sha))


# -- a real cluster ----------------------------------------------------------------------
@pytest.mark.integration
def test_a_fifo_run_fails_at_once_and_the_cpu_slots_stay_free(running_cluster: Cluster, write_experiment,
                                                              tmp_path: Path) -> None:
    """Two forged runs whose CSV is a FIFO (one per CPU worker, if they blocked they would
    hold both slots), then a genuine experiment runs to DONE on the same workers."""
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand

    _csv(tmp_path / "real.csv")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    cfg = write_experiment("fifo_forged", trainer="prior", datasets=[{"csv": "real.csv", "target": "label"}],
                           folds=2, resources={"gpus": 0})
    specs = [s.to_dict() for s in expand(load_experiments([str(cfg)])[0])]
    for spec in specs:
        spec["dataset"]["path"] = str(fifo)
    app = celery_app(running_cluster.url)
    started = time.monotonic()
    ids = [app.send_task("tasks.train_run", args=[spec], kwargs={"submitted_at": time.time()},
                         queue="cpu").id for spec in specs]
    layout = Layout(running_cluster.root)
    letters = DeadLetters.from_url(running_cluster.url)

    def refused() -> bool:  # refused before the claim: in the dead letters, saying why
        found = {d.get("task_id"): str(d.get("reason")) for d in letters.list(limit=1000)}
        return all("named pipe" in found.get(i, "") for i in ids)

    wait_for(refused, timeout=30, what="both FIFO runs to be refused")
    assert time.monotonic() - started < 30
    # A refused message writes nothing of the run.
    assert not any(layout.fold_status(RunSpec.from_dict(s)).exists() for s in specs)
    with pytest.raises(OSError) as info:  # no worker is left waiting on the pipe
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO
    genuine = write_experiment("fifo_after", trainer="prior", datasets=[{"csv": "real.csv", "target": "label"}],
                               folds=2, resources={"gpus": 0})
    proc = run_cli("submit", str(genuine), "--wait", env=running_cluster.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
