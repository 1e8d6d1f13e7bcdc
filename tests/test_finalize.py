"""finalize_group and final_results.csv against straightforward reference versions, byte
for byte: real folds, and hand-made folds with awkward class names, non-finite
probabilities and holdout rows that differ between folds. No Redis, no workers."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.collect.finalize import (
    GroupNotReady,
    finalize_group,
    fold_states,
    mark_group_failed,
)
from orchestrator.collect.metrics import scores, table_csv
from orchestrator.collect.results import FIRST_COLUMNS, _cache, update_final_results
from orchestrator.collect.status import Status, file_sizes, load_json, write_fold_status
from orchestrator.errors import InvalidSpecError
from orchestrator.execution.runner import WorkerInfo, execute
from orchestrator.experiment.config import load_experiments
from orchestrator.experiment.expand import expand, groups
from orchestrator.experiment.spec import RunSpec
from orchestrator.paths import Layout, read_json

_table = table_csv  # unchanged by this work; the reference keeps the old fmt below


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def reference(layout: Layout, specs: list[RunSpec]) -> tuple[str, str, dict[str, Any]]:
    """The ensemble as the first version of finalize computed it, row by row."""
    classes: list[str] = []
    truth: dict[int, str] = {}
    oof: list[tuple[int, int, list[float]]] = []
    hold: dict[int, Any] = {}
    for spec in sorted(specs, key=lambda s: s.fold):
        files = layout.fold_files(spec)
        with open(files["probabilities.csv"], newline="") as fh:
            reader = csv.reader(fh)
            classes = next(reader)[2:]
            rows = [(int(r[0]), r[1], [float(x) for x in r[2:]]) for r in reader]
        with open(files["predictions.csv"], newline="") as fh:
            for r in csv.DictReader(fh):
                truth[int(r["index"])] = r["y_true"]
        for index, split, probs in rows:
            if split == "val":
                oof.append((index, spec.fold, probs))
            else:
                hold[index] = hold.get(index, 0) + np.asarray(probs)
    oof.sort()
    hold_idx = sorted(hold)
    hold_probs = [hold[i] / len(specs) for i in hold_idx]
    oof_text = _table(["index", "fold", "y_true", "y_pred", *classes],
                      [[i, f, truth[i], classes[int(np.argmax(p))], *map(_fmt, p)] for i, f, p in oof])
    hold_text = _table(["index", "y_true", "y_pred", *classes],
                       [[i, truth[i], classes[int(np.argmax(p))], *map(_fmt, p)]
                        for i, p in zip(hold_idx, hold_probs, strict=True)])
    pos = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    metrics = {"oof": scores(np.array([pos[truth[i]] for i, _, _ in oof], dtype=np.int64),
                             np.array([p for _, _, p in oof]) if oof else np.zeros((0, n))),
               "ensemble_holdout": scores(np.array([pos[truth[i]] for i in hold_idx], dtype=np.int64),
                                          np.array(hold_probs) if hold_probs else np.zeros((0, n)))}
    return oof_text, hold_text, metrics


@pytest.fixture
def group(tmp_path: Path) -> tuple[Layout, list[RunSpec]]:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("experiment: fin\ntrainer: prior\ndatasets: [iris]\nfolds: 4\nholdout: 0.2\n"
                   "seeds: [0]\nparams: {smoothing: 0.5}\n")
    layout = Layout(tmp_path / "results")
    (specs,) = groups(expand(load_experiments([str(cfg)])[0]))
    for spec in specs:
        execute(spec, layout, WorkerInfo(name="w@host", device="cpu", gpu=None), 1)
    return layout, specs


def check(layout: Layout, specs: list[RunSpec]) -> dict[str, Any]:
    record = finalize_group(layout, specs)
    oof_text, hold_text, metrics = reference(layout, specs)
    files = layout.ensemble_files(specs[0])
    assert files["oof_predictions.csv"].read_text() == oof_text
    assert files["holdout_predictions.csv"].read_text() == hold_text
    written = read_json(files["metrics.json"])
    for part, values in metrics.items():  # (NaN: however the JSON writer spells it)
        assert written[part].keys() == values.keys()
        for name, value in values.items():
            got = written[part][name]
            assert got == value or (math.isnan(value) and (got is None or math.isnan(got))), (part, name)
    return record


def test_real_folds_match_the_reference(group: tuple[Layout, list[RunSpec]]) -> None:
    layout, specs = group
    record = check(layout, specs)
    assert record["train_status"] == Status.DONE.value
    # Fold states read by the caller give the same bytes.
    ensemble = {n: p.read_bytes() for n, p in layout.ensemble_files(specs[0]).items()}
    layout.group_status(specs[0]).unlink()
    finalize_group(layout, specs, states=fold_states(layout, specs))
    assert {n: p.read_bytes() for n, p in layout.ensemble_files(specs[0]).items()} == ensemble


def _rewrite(layout: Layout, spec: RunSpec, classes: list[str], rows: list[tuple[int, str, str, list[float]]]) -> None:
    """Replace a fold's outputs (index, split, y_true, probabilities), sizes recorded."""
    files = layout.fold_files(spec)
    files["probabilities.csv"].write_text(_table(["index", "split", *classes],
                                                 [[i, s, *map(_fmt, p)] for i, s, _, p in rows]))
    files["predictions.csv"].write_text(_table(["index", "split", "y_true", "y_pred"],
                                               [[i, s, y, classes[0]] for i, s, y, _ in rows]))
    meta = json.loads(files["metadata.json"].read_text())
    n_val = sum(s == "val" for _, s, _, _ in rows)
    meta.update(classes=classes, n_val=n_val, n_holdout=len(rows) - n_val)
    files["metadata.json"].write_text(json.dumps(meta))
    write_fold_status(layout, spec, Status.DONE, files=file_sizes(files))


def test_awkward_folds_match_the_reference(group: tuple[Layout, list[RunSpec]]) -> None:
    layout, specs = group
    classes = ['a,b', 'say "hi"', " lead", "new\nline", "", "'q'"]
    rng = np.random.default_rng(0)
    odd = [math.nan, math.inf, -math.inf, -0.0, 1e-300, 123456789.0, 0.1 + 0.2]
    for spec in specs:
        rows = []
        for i in range(40):
            index = (i * 7 + spec.fold * 3) % 50  # holdout rows differ between folds
            split = "val" if (i + spec.fold) % 3 == 0 else "holdout"
            probs = rng.random(len(classes)).tolist()
            if i % 5 == 0:
                probs[i % len(classes)] = odd[(i // 5 + spec.fold) % len(odd)]
            rows.append((index, split, classes[index % len(classes)], probs))
        rows.append(rows[-1])  # one holdout row twice in a fold: both count
        _rewrite(layout, spec, classes, rows)
    check(layout, specs)


def test_no_holdout_and_a_fold_not_done(group: tuple[Layout, list[RunSpec]]) -> None:
    layout, specs = group
    for spec in specs:
        _rewrite(layout, spec, ["x", "y"], [(spec.fold * 10 + i, "val", "xy"[i % 2], [0.25, 0.75]) for i in range(5)])
    check(layout, specs)
    layout.group_status(specs[0]).unlink()
    layout.fold_files(specs[1])["ranks.csv"].write_text("cut")  # not as recorded: not DONE
    with pytest.raises(GroupNotReady, match=r"folds \[1\] are not DONE"):
        finalize_group(layout, specs)
    record = mark_group_failed(layout, specs, reason="GroupNotReady: x")
    assert record["folds"] == {"0": "DONE", "1": "FAILED", "2": "DONE", "3": "DONE"}
    assert record["failed"]["finalize"] == "GroupNotReady: x" and record["train_status"] == "FAILED"


def _reference_csv(rows: dict[str, dict[str, str]]) -> str:
    columns = {k for r in rows.values() for k in r}
    header = FIRST_COLUMNS + sorted(columns - set(FIRST_COLUMNS))
    ordered = sorted(rows.values(), key=lambda r: (r["dataset"], r["point"], int(r["seed"]), int(r["fold"]), r["run_id"]))
    return _table(header, [[r.get(c, "") for c in header] for r in ordered])


def test_final_results_match_a_full_rewrite(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    path = layout.final_results("exp")
    expected: dict[str, dict[str, str]] = {}
    rng = np.random.default_rng(1)

    def row(run: int, **extra: Any) -> dict[str, Any]:
        # (a run's point changes between updates: its row moves)
        return {"experiment": "exp", "dataset": "iris", "point": f"p={rng.integers(0, 7)}", "seed": run % 3,
                "fold": run % 5, "run_id": f"r{run}", "group_id": "g", "accuracy": rng.random(),
                "worker": 'w,"1"', "attempt": None, **extra}

    for step in range(30):
        batch = [row(int(rng.integers(0, 40))) for _ in range(4)]
        if step == 10:
            batch.append(row(99, **{"param.lr": [1, 2]}))  # a new column: every line changes
        if step == 20:  # as if another process wrote it: read again
            _cache.clear()
        update_final_results(layout, "exp", batch)
        for r in batch:  # (a later row of the same run in the batch wins)
            expected[r["run_id"]] = {k: "" if v is None else "[1, 2]" if isinstance(v, list) else str(v)
                                     for k, v in r.items()}
        assert path.read_text() == _reference_csv(expected), f"step {step}"


def test_rows_without_one_value_per_class_are_refused(group: tuple[Layout, list[RunSpec]]) -> None:
    layout, specs = group
    for spec in specs:
        _rewrite(layout, spec, ["x", "y"], [(spec.fold * 10 + i, "val" if i else "holdout", "x", [0.2, 0.3, 0.5])
                                           for i in range(3)])
    with pytest.raises(ValueError, match="without one value per class"):
        finalize_group(layout, specs)


_SPEC = {"experiment": "fin", "trainer": "prior", "trainer_version": "1",
         "dataset": {"name": "iris", "source": "sklearn", "path": None, "target": None, "sha256": None},
         "params": {"smoothing": 0.5}, "point": "p", "seed": 0, "fold": 0, "k": 4,
         "validation": None, "holdout": 0.2, "output": "fin/iris", "overrides": {},
         "resources": {"gpus": 1.0, "gpu_memory_gb": None}, "retries": 0, "timeout": None,
         "priority": 5}


def test_group_callbacks_take_one_spec_and_the_folds() -> None:
    """What the canvas sends (one spec, the folds) gives the same runs as every fold's
    spec; anything else is refused with InvalidSpecError (the message is untrusted)."""
    from orchestrator.collect.groupend import group_specs as _specs

    every = [{**_SPEC, "fold": f} for f in range(4)]
    want = [RunSpec.from_dict(s) for s in every]
    got = _specs([_SPEC], [0, 1, 2, 3])
    assert got == want and [s.run_id for s in got] == [s.run_id for s in want]
    assert len({s.group_id for s in got}) == 1
    assert _specs(every) == want and _specs([every[2]], [3, 1]) == [want[3], want[1]]
    split = {**_SPEC, "k": None, "validation": 0.25}
    assert [s.fold for s in _specs([split], [0])] == [0]
    for specs, folds in (([_SPEC], [0, 0]), ([_SPEC], [4]), ([_SPEC], [-1]), ([_SPEC], [True]),
                         ([_SPEC], [1.0]), ([_SPEC], []), ([_SPEC], "0"), ([_SPEC], [[0]]), ([_SPEC], {0: 1}), ([_SPEC, _SPEC], [0]),
                         ([split], [1]), ([], [0]), ("x", [0]), ([{**_SPEC, "k": "4"}], [0])):
        with pytest.raises(InvalidSpecError):
            _specs(specs, folds)
    with pytest.raises(InvalidSpecError, match="share their group_id"):
        _specs([every[0], {**every[1], "seed": 1}])


@pytest.mark.parametrize("data", [
    b'{"a": 1, "b": [1.5, -0.0, null, true]}', b'\xef\xbb\xbf{"a":1}', b'{"a":1,"a":2,"b":3}', b'-0',
    b'1e400', b'[NaN, Infinity]', b'123456789012345678901234567890', b'-9223372036854775809',
    b'18446744073709551615', b'"\\ud800"', b'"a\xffb"', b'"\xed\xa0\x80"', b'{"a":1} x', b'', b' [] \n',
    b'{"t": "1234567890123456789012"}', b'4.9e-324', b'0.30000000000000004', b'"\\u0000\x7f"',
])
def test_load_json_reads_as_read_json(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(data)
    got, want = load_json(path), read_json(path)
    assert repr(got) == repr(want) and type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
    assert load_json(tmp_path / "missing.json") is None and load_json(tmp_path) is None


def _old_read_probs(path: Path) -> tuple[list[str], list[tuple[int, str, list[float]]]]:
    """finalize._read_probs before it split the rows as it read them."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [(int(r[0]), r[1], list(map(float, r[2:]))) for r in reader]
    return header[2:], rows


@pytest.mark.parametrize("body", [
    "", "index,split,a,b\n", "index,split,a,b\n1,val,0.5,x\nz,val,0.5,0.5\n",
    "index,split,a,b\nz,val,0.5,x\n", "index,split,a,b\n1,val,0.5,0.5\n\n2,val,1,0\n",
    "index,split,a,b\n1\n", "index,split,a,b\n1,holdout,0.5,0.5\n2,val,nan,inf\n3,val\n",
    "index,split,a,b\n1,val,0.5,0.5\n2,val,0.5,0.5,0.1\n",
])
def test_malformed_probabilities_fail_as_before(group: tuple[Layout, list[RunSpec]], body: str) -> None:
    """A fold whose probabilities.csv cannot be read: the same error as the old code
    (finalize records its text in status.json)."""
    layout, specs = group
    files = layout.fold_files(specs[0])
    files["probabilities.csv"].write_text(body)
    write_fold_status(layout, specs[0], Status.DONE, files=file_sizes(files))
    try:
        _old_read_probs(files["probabilities.csv"])  # then its metadata.json differs
        expected = (f"ValueError: fold 0: its outputs do not match its metadata.json (classes, validation "
                    f"or holdout rows): {files['probabilities.csv']}")
    except Exception as exc:  # (StopIteration too: an empty file)
        expected = f"{type(exc).__name__}: {exc}"
    with pytest.raises(Exception) as got:
        finalize_group(layout, specs)
    assert f"{got.type.__name__}: {got.value}" == expected


def _old_fold_outputs(table: Any, rows: np.ndarray, n_val: int, probs: np.ndarray) -> dict[str, str]:
    """The fold's three tables as runner._write_outputs wrote them through csv.writer
    (metrics.table_csv) before it wrote them line by line."""
    from orchestrator.collect.metrics import ranks

    split_of = ["val"] * n_val + ["holdout"] * (len(rows) - n_val)
    classes = list(table.classes)
    index, truth = rows.tolist(), table.y[rows].tolist()
    return {
        "predictions.csv": _table(["index", "split", "y_true", "y_pred"], [
            (r, s, classes[t], classes[p])
            for r, s, t, p in zip(index, split_of, truth, probs.argmax(axis=1).tolist(), strict=True)]),
        "probabilities.csv": _table(["index", "split", *classes], [
            (r, s, *map(_fmt, pr)) for r, s, pr in zip(index, split_of, probs.tolist(), strict=True)]),
        "ranks.csv": _table(["index", "split", *classes], [
            (r, s, *rk) for r, s, rk in zip(index, split_of, ranks(probs).tolist(), strict=True)]),
    }


@pytest.mark.parametrize("classes", [
    ["setosa", "versicolor", "virginica"],
    ['a,b', 'say "hi"', " lead", "new\nline", "", "'q'", "1.5", "ünï"],
    ["only"],
])
def test_fold_outputs_are_the_bytes_csv_writer_wrote(tmp_path: Path, classes: list[str]) -> None:
    from orchestrator.execution.runner import _write_outputs
    from orchestrator.experiment.datasets import Table

    rng = np.random.default_rng(len(classes))
    n = 23
    table = Table(X=np.zeros((n, 1), dtype=np.float32), y=rng.integers(0, len(classes), n),
                  classes=tuple(classes), features=("x",))
    rows = rng.permutation(n)[:17]
    probs = rng.random((len(rows), len(classes)))
    odd = [math.nan, math.inf, -math.inf, -0.0, 1e-300, 123456789.0, 0.1 + 0.2, 1.0]
    for i, value in enumerate(odd):
        probs[i % len(rows), i % len(classes)] = value
    _write_outputs(tmp_path / "fold", table, rows, 9, probs, {"x": 1})
    for name, text in _old_fold_outputs(table, rows, 9, probs).items():
        assert (tmp_path / "fold" / name).read_bytes() == text.encode(), name


def test_two_finalizes_of_one_group_at_once_write_it_once(group: tuple[Layout, list[RunSpec]],
                                                         redis_url: str) -> None:
    """The chord body and a finalize-only task (a second client published it while the
    body was on its way: tests/test_api.py found both ran) finalize one group at the
    same moment: they take the group's lock in turn, one writes, the other finds the
    group DONE and writes nothing. The audit counter says 1, the outputs are intact."""
    import threading

    import redis

    from orchestrator import keys
    from orchestrator.collect.groupend import GroupEnd
    from orchestrator.execution.attempt import Delivery
    from orchestrator.execution.returns import Returns
    from orchestrator.livestate import LiveState

    layout, specs = group
    client = redis.Redis.from_url(redis_url)
    ends = [GroupEnd(layout, LiveState(client), Returns(client), 1 << 20) for _ in range(2)]
    wire = [specs[0].to_dict()], [s.fold for s in specs]
    start, results, errors = threading.Barrier(2), [], []

    def finalize(end: GroupEnd, n: int) -> None:
        start.wait()
        try:
            results.append(end.finalize(*wire, Delivery(task_id=f"t{n}", task="tasks.finalize")))
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=finalize, args=(end, n)) for n, end in enumerate(ends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and [r["train_status"] for r in results] == ["DONE", "DONE"]
    assert int(client.get(keys.group_finalized(specs[0].experiment, specs[0].group_id)) or 0) == 1
    assert not client.exists(keys.group_finalizing(specs[0].experiment, specs[0].group_id))  # released
    check(layout, specs)  # outputs as the reference computes them
    rows = [r for r in csv.DictReader(open(layout.final_results(specs[0].experiment)))]
    assert sorted(r["run_id"] for r in rows) == sorted(s.run_id for s in specs)


def test_a_redis_restart_during_finalize_does_not_fail_the_group(
        group: tuple[Layout, list[RunSpec]], restartable_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis is killed in the middle of a group's finalize (holding the group's lock, at
    its audit count) and started again, with its data, a second later: not the group's
    failure. The finalize waits for Redis, takes its lock again and writes the group
    DONE, once; the lock is released."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from orchestrator import keys
    from orchestrator.collect.groupend import GroupEnd
    from orchestrator.execution.attempt import Delivery
    from orchestrator.execution.returns import Returns
    from orchestrator.livestate import LiveState

    layout, specs = group
    client = redis.Redis.from_url(restartable_redis.url, retry=Retry(NoBackoff(), 0))  # no retries of its own
    live = LiveState(client)
    real = live.count_finalize
    restarts: list[Any] = []

    def count_finalize(*args: Any) -> int:
        if not restarts:
            restarts.append(restartable_redis.restart_soon())
        return real(*args)

    monkeypatch.setattr(live, "count_finalize", count_finalize)
    end = GroupEnd(layout, live, Returns(client), 1 << 20)
    started = time.monotonic()
    result = end.finalize([specs[0].to_dict()], [s.fold for s in specs], Delivery(task_id="t", task="tasks.finalize"))
    restarts[0].join(timeout=30)
    assert result["train_status"] == "DONE"
    assert read_json(layout.group_status(specs[0]))["train_status"] == "DONE"
    assert time.monotonic() - started < 30  # not after the lock's expiry (120 s)
    assert int(client.get(keys.group_finalized(specs[0].experiment, specs[0].group_id)) or 0) == 1
    assert not client.exists(keys.group_finalizing(specs[0].experiment, specs[0].group_id))
    check(layout, specs)
