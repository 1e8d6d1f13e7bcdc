"""`orchestrator report` on a real, finished sweep (local mode), then on damaged copies of
it: the HTML parses, every image is a valid PNG, the table matches final_results.csv,
and whatever is missing is reported instead of crashing."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import statistics
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.dispatch.manifest import load_manifest
from orchestrator.experiment.spec import RunSpec
from orchestrator.paths import Layout
from orchestrator.views.htmlreport import collect, worker_spans

from .conftest import cli_env, run_cli

pytestmark = pytest.mark.integration

EXPERIMENT = "report_sweep"
SWEEP = {
    "experiment": EXPERIMENT, "trainer": "mlp", "datasets": ["iris"], "folds": 3, "seeds": [0, 1],
    "params": {"epochs": 5, "batch_size": 32},
    "sweep": {"grid": {"hidden": [[8], [16, 8]], "lr": [0.001, 0.01, 0.1]}},
    "resources": {"gpus": 0},
}  # 6 points x 2 seeds = 12 groups, 36 runs


@pytest.fixture(scope="module")
def finished_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results root of the sweep above, run to the end by `orchestrator run`."""
    base = tmp_path_factory.mktemp("report")
    config = base / "sweep.yaml"
    config.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    root = base / "results"
    proc = run_cli("run", str(config), env=cli_env(ORCH_RESULTS_ROOT=str(root)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture
def results_copy(finished_root: Path, tmp_path: Path) -> Path:
    """A copy of the finished results a test may damage."""
    root = tmp_path / "results"
    shutil.copytree(finished_root, root)
    for stale in root.glob(f"{EXPERIMENT}/report*"):  # a report another test wrote
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return root


class Page(HTMLParser):
    """What the tests look at in a report: images, links, the best-groups table, the
    list of missing things."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.rows: list[tuple[dict[str, str], list[tuple[dict[str, str], str]]]] = []
        self.missing: list[str] = []
        self._table: str | None = None
        self._cell: tuple[dict[str, str], list[str]] | None = None
        self._in_missing = self._li = False
        self._li_text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table == "best":
            self.rows.append((a, []))
        elif tag == "td" and self._table == "best" and self.rows:
            self._cell = (a, [])
        elif tag == "ul" and a.get("class") == "missing":
            self._in_missing = True
        elif tag == "li" and self._in_missing:
            self._li, self._li_text = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "ul":
            self._in_missing = False
        elif tag == "li" and self._li:
            self.missing.append("".join(self._li_text))
            self._li = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)
        if self._li:
            self._li_text.append(data)

    def best_rows(self) -> list[tuple[str, dict[str, tuple[str, str]]]]:
        """(group_id, column -> (data-value, text)) per table body row."""
        return [(tr["data-group-id"], {td["data-col"]: (td.get("data-value", ""), text)
                                       for td, text in cells if "data-col" in td})
                for tr, cells in self.rows if "data-group-id" in tr]


def assert_valid_png(data: bytes) -> tuple[int, int]:
    """PNG signature, an IHDR chunk with a matching CRC, and pixels that decode."""
    from matplotlib.image import imread

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29])
    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (height, width) and width > 100 and height > 100
    return width, height


def report(root: Path, *args: str) -> tuple[Page, Path, str]:
    """Run `orchestrator report`; the parsed page, its path and what the command printed."""
    proc = run_cli("report", EXPERIMENT, "--results-root", str(root), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = Path(proc.stdout.split("report: ", 1)[1].splitlines()[0])
    return Page(path.read_text()), path, proc.stdout


def check_images(page: Page, html_path: Path) -> dict[str, bytes]:
    """Every <img> is an embedded PNG that is also saved, byte for byte, beside the HTML."""
    saved = {}
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,"), img["src"][:60]
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert_valid_png(data)
        saved[img["alt"]] = data
    pngs = sorted((html_path.parent / f"{html_path.stem}_files").glob("*.png"))
    assert sorted(p.read_bytes() for p in pngs) == sorted(saved.values())
    links = [h for h in page.links if h.endswith(".png")]
    assert sorted(links) == sorted(f"{html_path.stem}_files/{p.name}" for p in pngs)
    assert not [h for h in page.links if h.startswith(("http:", "https:", "//"))]
    return saved


def csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / EXPERIMENT / "final_results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_of_finished_sweep_matches_final_results(finished_root: Path) -> None:
    page, path, printed = report(finished_root)
    assert path == finished_root / EXPERIMENT / "report.html"
    assert f"{EXPERIMENT}: 12/12 groups DONE, 36/36 runs DONE" in printed
    images = check_images(page, path)
    assert set(images) == {"accuracy against hidden", "accuracy against lr", "Per-fold scores per group",
                           "Confusion matrices of the best group of each dataset",
                           "Runs per worker over time"}
    assert page.missing == []

    rows = csv_rows(finished_root)
    assert len(rows) == 36
    by_group: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_group.setdefault(r["group_id"], []).append(r)
    table = page.best_rows()
    assert len(table) == 10  # --top default, of 12 groups
    means = []
    for group_id, cells in table:
        mine = by_group[group_id]
        assert cells["folds"][1] == "3/3"
        for column in ("accuracy", "log_loss", "macro_f1", "holdout_accuracy"):
            mean = statistics.fmean(float(r[column]) for r in mine)
            value, text = cells[column]
            assert float(value) == pytest.approx(mean, abs=1e-12) and text == f"{mean:.4f}"
        for param in ("hidden", "lr"):
            assert cells[f"param.{param}"][1] == mine[0][f"param.{param}"]
        assert float(cells["seconds"][0]) == pytest.approx(sum(float(r["seconds"]) for r in mine))
        means.append(float(cells["accuracy"][0]))
    assert means == sorted(means, reverse=True)
    assert means[0] == pytest.approx(max(statistics.fmean(float(r["accuracy"]) for r in g)
                                         for g in by_group.values()))
    # the last two columns come from each group's status.json
    layout = Layout(finished_root)
    dirs = {g["group_id"]: g["dir"] for g in load_manifest(layout, EXPERIMENT)["groups"]}
    for group_id, cells in table:
        status = json.loads((layout.group_root(dirs[group_id]) / "status" / "status.json").read_text())
        assert float(cells["oof_accuracy"][0]) == status["metrics"]["oof"]["accuracy"]
        assert float(cells["ensemble_accuracy"][0]) == status["metrics"]["ensemble_holdout"]["accuracy"]

    page5, _, _ = report(finished_root, "--top", "3", "--metric", "log_loss",
                         "--output", str(finished_root / "other.html"))
    losses = [float(c["log_loss"][0]) for _, c in page5.best_rows()]
    assert len(losses) == 3 and losses == sorted(losses)
    assert (finished_root / "other_files" / "timeline.png").is_file()


def test_partly_finished_experiment_still_reports(results_copy: Path) -> None:
    layout = Layout(results_copy)
    groups = load_manifest(layout, EXPERIMENT)["groups"]
    unfinalized, damaged, failed = (RunSpec.from_dict(groups[i]["runs"][0]) for i in (0, 1, 2))
    layout.group_status(unfinalized).unlink()  # folds DONE, finalize never ran
    (layout.fold_dir(damaged) / "predictions.csv").unlink()  # an output lost after the fact
    # a failed group: one fold FAILED (with markup in its error), no ensemble, no CSV rows
    failed_fold = RunSpec.from_dict(groups[2]["runs"][1])
    record = json.loads(layout.fold_status(failed_fold).read_text())
    (last,) = record["history"]
    retry = {"attempt": 1, "worker": "gpu0@other", "started_at": last["started_at"] - 5,
             "finished_at": last["started_at"] - 4, "outcome": "RETRY"}
    record.update(status="FAILED", error="<script>alert(1)</script> out of memory",
                  history=[retry, {**last, "attempt": 2, "outcome": "FAILED"}])
    layout.fold_status(failed_fold).write_text(json.dumps(record))
    layout.group_status(failed).unlink()
    shutil.rmtree(layout.ensemble_dir(failed))
    rows = [r for r in csv_rows(results_copy) if r["group_id"] != failed.group_id]
    with open(layout.final_results(EXPERIMENT), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    page, path, printed = report(results_copy)
    assert f"{EXPERIMENT}: 10/12 groups DONE, 34/36 runs DONE" in printed
    assert "listed in the report" in printed
    check_images(page, path)
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; out of memory" in text
    assert page.missing == [
        f"{unfinalized.group_name}: group IN_PROGRESS, 3/3 folds DONE",
        f"{damaged.group_name}: fold {damaged.fold}: outputs missing or changed since they were written",
        f"{failed.group_name}: group IN_PROGRESS, 2/3 folds DONE",
        f"{failed.group_name}: fold 1: FAILED: <script>alert(1)</script> out of memory",
    ]
    table = dict(page.best_rows())
    assert failed.group_id not in table
    assert len(table) == 10  # 11 groups still have rows in final_results.csv
    # the timeline draws every attempt in a run's history, on the worker that made it
    spans = worker_spans(collect(layout, EXPERIMENT))
    assert spans["gpu0@other"] == [(retry["started_at"], retry["finished_at"], "RETRY")]
    assert (last["started_at"], last["finished_at"], "FAILED") in spans[last["worker"]]
    assert sum(len(s) for s in spans.values()) == 37  # 36 runs, one of them twice
    assert '<td>gpu0@other</td><td class="num">1</td>' in text


def test_report_before_anything_finished(results_copy: Path) -> None:
    """Submitted, nothing run yet: no plots, but a page that says so."""
    layout = Layout(results_copy)
    for g in load_manifest(layout, EXPERIMENT)["groups"]:
        shutil.rmtree(layout.group_root(g["dir"]))
    layout.final_results(EXPERIMENT).unlink()
    page, path, printed = report(results_copy)
    assert f"{EXPERIMENT}: 0/12 groups DONE, 0/36 runs DONE" in printed
    assert page.images == [] and page.best_rows() == []
    assert page.missing[0].endswith("does not exist yet: no group has been finalized")
    assert len(page.missing) == 1 + 12 * (1 + 3)  # per group: its state and each fold's
    first = load_manifest(layout, EXPERIMENT)["groups"][0]["name"]
    assert page.missing[1:3] == [f"{first}: group PENDING, 0/3 folds DONE",
                                 f"{first}: fold 0: no status record (not started)"]
    assert "No run has started yet." in path.read_text()


def test_unknown_experiment_and_bad_names(finished_root: Path) -> None:
    proc = run_cli("report", "nope", "--results-root", str(finished_root))
    assert proc.returncode == 2
    assert f"no experiment 'nope' under {finished_root}" in proc.stderr
    assert f"experiments there: {EXPERIMENT}" in proc.stderr
    proc = run_cli("report", "../x", "--results-root", str(finished_root))
    assert proc.returncode == 2 and "error:" in proc.stderr
    proc = run_cli("report", EXPERIMENT, "--results-root", str(finished_root), "--top", "0")
    assert proc.returncode == 2 and "--top" in proc.stderr


def test_open_uses_the_browser(finished_root: Path, tmp_path: Path) -> None:
    browser = tmp_path / "browser.sh"
    seen = tmp_path / "opened.txt"
    browser.write_text(f'#!/bin/sh\necho "$1" > "{seen}"\n')
    browser.chmod(0o755)
    out = tmp_path / "r.html"
    env = cli_env(BROWSER=str(browser))
    env.pop("DISPLAY", None)
    proc = run_cli("report", EXPERIMENT, "--results-root", str(finished_root), "-o", str(out), "--open",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    assert seen.read_text().strip() == out.resolve().as_uri()


def test_open_without_a_browser_prints_the_path(finished_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    from orchestrator.cli import cli

    def no_browser(*_: Any, **__: Any) -> bool:
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "open", no_browser)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", EXPERIMENT, "--results-root", str(finished_root),
                                      "-o", str(out), "--open"])
    assert result.exit_code == 0, result.output
    assert f"no web browser found here; open {out.resolve()} yourself" in result.output
    assert out.is_file()
