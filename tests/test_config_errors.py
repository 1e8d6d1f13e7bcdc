"""Every configuration mistake ends in exit code 2 and one line naming file, key path and fix.

The CLI runs in-process (`orchestrator.cli.main()` with a patched argv), so the table is
fast; one test runs `python -m orchestrator run` for real to show nothing is written.
No Redis is needed anywhere here: validation fails before any broker is touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator import cli

REPO = Path(__file__).resolve().parents[1]

# A valid base: every case below changes or adds one thing.
HEAD = """\
experiment: iris_cfg
trainer: mlp
datasets: [iris]
"""


@dataclass(frozen=True)
class Case:
    id: str
    yaml: str
    key: str | None  # key path the message must name (None: file-level, e.g. YAML syntax)
    fragment: str  # part of the explanation
    files: dict[str, str] = field(default_factory=dict)  # extra files next to the YAML


IRIS_CSV = "a,b,label\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n"

CASES = [
    Case("unknown-top-key-did-you-mean", HEAD + "seed: [1]\n", "seed",
         "unknown key (did you mean 'seeds'?)"),
    Case("missing-experiment", "trainer: mlp\ndatasets: [iris]\n", "experiment",
         "required key is missing"),
    Case("experiment-name-slash", HEAD.replace("iris_cfg", "team/iris"), "experiment",
         "'team/iris' is not a valid name"),
    Case("experiment-name-space", HEAD.replace("iris_cfg", "'my exp'"), "experiment",
         "'my exp' is not a valid name"),
    Case("unknown-trainer-did-you-mean", HEAD.replace("trainer: mlp", "trainer: mpl"), "trainer",
         "did you mean 'mlp'?"),
    Case("unknown-builtin-dataset", HEAD.replace("[iris]", "[iris, wnie]"), "datasets[1]",
         "unknown built-in dataset 'wnie' (did you mean 'wine'?)"),
    Case("csv-file-missing", HEAD.replace("[iris]", "[{csv: nowhere.csv, target: label}]"),
         "datasets[0].csv", "file not found"),
    Case("csv-target-missing", HEAD.replace("[iris]", "[{csv: data.csv}]"), "datasets[0].target",
         "must name the CSV column", files={"data.csv": IRIS_CSV}),
    Case("csv-target-not-a-column", HEAD.replace("[iris]", "[{csv: data.csv, target: klass}]"),
         "datasets[0]", "no column 'klass'", files={"data.csv": IRIS_CSV}),
    Case("csv-unknown-key", HEAD.replace("[iris]", "[{csv: data.csv, target: label, tagret: y}]"),
         "datasets[0].tagret", "unknown key (did you mean 'target'?)", files={"data.csv": IRIS_CSV}),
    Case("duplicate-dataset", HEAD.replace("[iris]", "[iris, iris]"), "datasets",
         "dataset name 'iris' appears twice"),
    Case("folds-below-2", HEAD + "folds: 1\n", "folds", "must be an integer from 2 to 100, got 1"),
    Case("folds-and-split", HEAD + "folds: 5\nsplit: {validation: 0.2}\n", "split",
         "either 'folds' (k-fold) or 'split' (one split), not both"),
    Case("split-validation-range", HEAD + "split: {validation: 1.5}\n", "split.validation",
         "must be a fraction between 0 and 1, got 1.5"),
    Case("holdout-too-large", HEAD + "holdout: 0.9\n", "holdout",
         "must be a fraction from 0 to below 0.9, got 0.9"),
    Case("seeds-not-integers", HEAD + "seeds: [1, two]\n", "seeds",
         "must be a list of non-negative integers"),
    Case("seeds-repeated", HEAD + "seeds: [3, 3]\n", "seeds", "has repeated seeds"),
    Case("unknown-param-did-you-mean", HEAD + "params: {lrr: 0.1}\n", "params.lrr",
         "unknown parameter 'lrr' for trainer 'mlp' (did you mean 'lr'?)"),
    Case("param-wrong-type", HEAD + "params: {epochs: ten}\n", "params.epochs",
         "must be an integer >= 1, got 'ten'"),
    Case("param-out-of-range", HEAD + "params: {dropout: 1.5}\n", "params.dropout",
         "must be <= 0.95, got 1.5"),
    Case("param-not-in-choices", HEAD + "params: {activation: swish}\n", "params.activation",
         "must be one of relu, tanh, gelu, sigmoid, leaky_relu, got 'swish'"),
    Case("device-override-unknown-param", HEAD + "cuda: {batch_sise: 64}\n", "cuda.batch_sise",
         "did you mean 'batch_size'?"),
    Case("grid-empty-list", HEAD + "sweep:\n  grid:\n    lr: []\n", "sweep.grid.lr",
         "must be a non-empty list of values"),
    Case("zip-unequal-lengths",
         HEAD + "sweep:\n  zip:\n    lr: [0.1, 0.01]\n    epochs: [10, 20, 30]\n", "sweep.zip",
         "lists must have equal lengths, got lr: 2, epochs: 3"),
    Case("random-low-above-high",
         HEAD + "sweep:\n  random:\n    samples: 4\n    space:\n      dropout: {uniform: [0.5, 0.1]}\n",
         "sweep.random.space.dropout", "with low < high, got [0.5, 0.1]"),
    Case("random-loguniform-nonpositive",
         HEAD + "sweep:\n  random:\n    samples: 4\n    space:\n      lr: {loguniform: [0, 0.1]}\n",
         "sweep.random.space.lr", "loguniform needs low > 0"),
    Case("unknown-sweep-kind", HEAD + "sweep:\n  grdi:\n    lr: [0.1]\n", "sweep.grdi",
         "unknown sweep kind (did you mean 'grid'?)"),
    Case("param-fixed-and-swept", HEAD + "params: {lr: 0.1}\nsweep:\n  grid:\n    lr: [0.1, 0.01]\n",
         "params.lr", "'lr' is both fixed in 'params' and swept in 'sweep'"),
    Case("param-swept-on-two-axes",
         HEAD + "sweep:\n  grid:\n    lr: [0.1]\n  zip:\n    lr: [0.2]\n", "sweep",
         "parameter 'lr' is swept on more than one axis"),
    Case("gpus-negative", HEAD + "resources: {gpus: -1}\n", "resources.gpus",
         "must be 0 (CPU), a share of one GPU up to 1 (0.25, 0.5, 1), or a whole number of GPUs "
         "of one host (2, 4, 8), got -1"),
    Case("gpus-too-many", HEAD + "resources: {gpus: 100}\n", "resources.gpus",
         "or a whole number of GPUs of one host (2, 4, 8), got 100"),
    Case("gpus-fraction-above-one", HEAD + "resources: {gpus: 1.5}\n", "resources.gpus",
         "a share of one GPU up to 1 (0.25, 0.5, 1), or a whole number of GPUs of one host (2, 4, 8), got 1.5"),
    Case("resources-unknown-key", HEAD + "resources: {gpu: 1}\n", "resources.gpu",
         "unknown key (did you mean 'gpus'?)"),
    Case("priority-too-high", HEAD + "priority: 12\n", "priority",
         "must be an integer from 0 to 9, got 12"),
    Case("timeout-negative", HEAD + "timeout: -5\n", "timeout",
         "must be a positive number of seconds, got -5"),
    Case("output-unknown-placeholder", HEAD + "output: '{experiment}/{foo}'\n", "output",
         "unknown placeholder {foo}"),
    Case("output-escapes-root", HEAD + "output: ../x\n", "output", "unsafe component '..'"),
    Case("output-absolute", HEAD + "output: /tmp/x\n", "output", "must be a relative path"),
    # line 2 has a second ':' inside a plain scalar value
    Case("yaml-syntax-error", "experiment: iris_cfg\ntrainer: mlp: x\ndatasets: [iris]\n", None,
         "YAML syntax error at line 2, column 13"),
    Case("yaml-duplicate-key", HEAD + "folds: 5\nholdout: 0.1\nfolds: 3\n", None,
         "YAML syntax error at line 6, column 1: duplicate key 'folds' (first on line 4)"),
    Case("yaml-not-a-mapping", "- experiment: iris_cfg\n", None, "must be a YAML mapping"),
    Case("folds-exceed-smallest-class", HEAD + "folds: 60\n", "folds",
         "60 folds need at least 60 samples of every class, but class 'setosa' of dataset "
         "'iris' has 40 after the holdout"),
]


def _flat(text: str) -> str:
    """Whitespace-normalised text, so that wrapped lines do not matter."""
    return " ".join(text.split())


def _problem_items(stderr: str) -> list[str]:
    """The '  - <file>: <key>: <message>' items of a ConfigError, whitespace-normalised."""
    return [item.strip() for item in _flat(stderr).split(" - ")[1:]]


def _validate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              *args: str) -> tuple[int | str | None, str]:
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(sys, "argv", ["orchestrator", "validate", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    return info.value.code, captured.err


def _assert_reported(stderr: str, path: Path, key: str | None, fragment: str) -> None:
    where = f"{path}: {key}: " if key else f"{path}: "
    items = _problem_items(stderr)
    matching = [i for i in items if i.startswith(where) and _flat(fragment) in i]
    assert matching, f"no problem {where!r} containing {fragment!r} in:\n{stderr}"


def _write(tmp_path: Path, case: Case, name: str = "exp.yaml") -> Path:
    for fname, content in case.files.items():
        (tmp_path / fname).write_text(content)
    path = tmp_path / name
    path.write_text(case.yaml)
    return path


def test_table_is_big_enough() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 18


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_config_mistake_is_reported(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, case)
    code, stderr = _validate(monkeypatch, capsys, str(path))
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert str(path) in stderr
    if case.key is not None:
        assert case.key in stderr
    assert _flat(case.fragment) in _flat(stderr), stderr
    _assert_reported(stderr, path, case.key, case.fragment)


def test_valid_base_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The base every case modifies is itself valid (so each case tests one mistake)."""
    path = tmp_path / "ok.yaml"
    path.write_text(HEAD)
    monkeypatch.setattr(sys, "argv", ["orchestrator", "validate", str(path)])
    cli.main()  # no SystemExit: success
    out = capsys.readouterr().out
    assert "OK" in out and "iris_cfg" in out


def test_three_mistakes_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(HEAD + "seed: [1]\npriority: 12\nparams: {lrr: 0.1}\n")
    code, stderr = _validate(monkeypatch, capsys, str(path))
    assert code == 2
    assert "Traceback" not in stderr
    assert "3 problems in the configuration" in _flat(stderr)
    _assert_reported(stderr, path, "seed", "did you mean 'seeds'?")
    _assert_reported(stderr, path, "priority", "from 0 to 9, got 12")
    _assert_reported(stderr, path, "params.lrr", "did you mean 'lr'?")


def test_folder_validates_every_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "a_good.yaml").write_text(HEAD)
    bad_one = folder / "b_bad.yaml"
    bad_one.write_text(HEAD.replace("iris_cfg", "other") + "holdout: 0.95\n")
    bad_two = folder / "c_bad.yaml"
    bad_two.write_text(HEAD.replace("iris_cfg", "third") + "resources: {gpus: 1.5}\n")
    (folder / "notes.txt").write_text("seed: not yaml config\n")  # ignored: not *.yaml
    code, stderr = _validate(monkeypatch, capsys, str(folder))
    assert code == 2
    assert "Traceback" not in stderr
    assert "2 problems in the configuration" in _flat(stderr)
    _assert_reported(stderr, bad_one, "holdout", "below 0.9, got 0.95")
    _assert_reported(stderr, bad_two, "resources.gpus", "got 1.5")
    assert "notes.txt" not in stderr


def test_duplicate_experiment_names_across_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    first.write_text(HEAD)
    second.write_text(HEAD)
    code, stderr = _validate(monkeypatch, capsys, str(first), str(second))
    assert code == 2
    _assert_reported(stderr, second, "experiment", f"name 'iris_cfg' is also used by {first}")


def test_missing_file_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    code, stderr = _validate(monkeypatch, capsys, str(missing))
    assert code == 2
    assert "Traceback" not in stderr
    _assert_reported(stderr, missing, None, "no such file or folder")


# -- regressions: bugs found in review, fixed since ------------------------------------
BUGS = [
    pytest.param(HEAD + "params: {lr: .nan}\n", "params.lr", "got nan",
                 id="param-nan"),
    pytest.param(HEAD + "params: {weight_decay: .inf}\n", "params.weight_decay", "got inf",
                 id="param-inf"),
    pytest.param(HEAD + "timeout: .inf\n", "timeout", "got inf",
                 id="timeout-inf"),
    pytest.param(HEAD + "sweep:\n  grid:\n    lr: [0.01, -1]\n", "sweep.grid.lr", "must be >= 1e-08",
                 id="grid-value-key-path"),
    pytest.param(HEAD.replace("iris_cfg", "'[/oops]'"), "experiment", "is not a valid name",
                 id="markup-closing-tag-in-value"),
    pytest.param("experiment: iris_cfg\ntrainer: mlp\n", "datasets", "a list such as [iris, wine]",
                 id="markup-brackets-swallowed"),
    pytest.param(HEAD + "sweep:\n  random:\n    samples: 2\n    space:\n      lr: {uniform: [0.5, 0.1]}\n",
                 "sweep.random.space.lr", "uniform needs [low, high] with low < high",
                 id="markup-low-high-swallowed"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), BUGS)
def test_regressions(text: str, key: str, fragment: str, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, Case("bug", text, key, fragment))
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(sys, "argv", ["orchestrator", "validate", str(path)])
    code: int | str | None = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # an escaped exception is what a traceback would show
        code = f"uncaught {type(exc).__name__}: {exc}"
    stderr = capsys.readouterr().err
    assert code == 2, f"exit {code!r}, stderr:\n{stderr}"
    assert "Traceback" not in stderr
    _assert_reported(stderr, path, key, fragment)


# -- `run` with a bad file: exit 2 before anything is enqueued or written ------------
def test_run_subprocess_bad_config_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "BAD.yaml"
    bad.write_text(HEAD + "resources: {gpus: -1}\n")
    results = tmp_path / "results"
    results.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(COLUMNS="300", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(bad), "--results-root", str(results)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_reported(proc.stderr, bad, "resources.gpus", "got -1")
    assert list(results.rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BAD.yaml", "results"]
