"""Bad input across every command: exit 2, one ``Error:`` line naming the bad value, no traceback, nothing written.

Also: every numeric hyperparameter declares its allowed range next to its default (``hp()``), and
every method's Optuna search space lies inside those ranges (tuning samples get the same check).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
import typing
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from benchmark.cli import main
from benchmark.teachers import teacher_dir
from methods import get_method, method_names
from methods.core.method import Range, coerce_value


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folders`` with its size and modification time."""
    out = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            stat = path.stat()
            out[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return out


@pytest.fixture()
def workspace(results_dir: Path, data_root: Path, tmp_path: Path, monkeypatch):
    """A results folder with the session's teachers and no tracking store; the working directory is a fresh folder."""
    results = tmp_path / "results"
    shutil.copytree(results_dir / "teachers", results / "teachers")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name in ("DFKD_RESULTS", "MLFLOW_TRACKING_URI", "DFKD_TUNE_STORAGE", "DFKD_QUEUE_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    bad_grid = tmp_path / "bad-grid.yaml"
    bad_grid.write_text("name: bad\ndatasets: [mnist]\nmethods:\n  - {name: kd-real, overrides: {lr: -0.1}}\n")

    def invoke(*args: str):
        env = {"DFKD_DATA": str(data_root)}
        return CliRunner().invoke(main, [*args, "--results", str(results)], env=env)

    return results, cwd, bad_grid, invoke


DISTILL = ["distill", "--method", "dfad", "--dataset", "mnist", "--teacher", "lenet5", "--student", "lenet5-half",
           "--iterations", "2", "--device", "cpu"]
KD_COLLECTED = ["distill", "--method", "kd-collected", "--dataset", "mnist", "--teacher", "lenet5", "--student",
                "lenet5-half", "--collected", "10", "--iterations", "2", "--device", "cpu"]
TUNE = ["tune", "--method", "kd-collected", "--collected", "10", "--trials", "1", "--iterations", "2", "--device", "cpu"]

# (arguments, text the one Error line must contain, whether click's usage lines precede it)
CASES = [
    # hyperparameters of the right type but outside their meaning (ranges declared with hp())
    ([*DISTILL, "--set", "lr_s=nan"], "bad value nan for hyperparameter 'lr_s' of method 'dfad'", False),
    ([*DISTILL, "--set", "lr_s=-0.1"], "bad value -0.1 for hyperparameter 'lr_s' of method 'dfad'; allowed: >= 0", False),
    ([*DISTILL, "--set", "batch_size=0"], "bad value 0 for hyperparameter 'batch_size' of method 'dfad'; allowed: >= 1",
     False),
    ([*DISTILL, "--set", "student_steps=0"], "bad value 0 for hyperparameter 'student_steps' of method 'dfad'", False),
    ([*DISTILL, "--set", "lr_g=inf"], "bad value inf for hyperparameter 'lr_g'", False),
    ([*KD_COLLECTED, "--set", "lr=-1"], "bad value -1.0 for hyperparameter 'lr' of method 'kd-collected'", False),
    ([*KD_COLLECTED, "--set", "tau=0"], "bad value 0.0 for hyperparameter 'tau'", False),
    # run
    (["run", "--grid", "{bad_grid}"], "methods[0].overrides: bad value -0.1 for hyperparameter 'lr' of method 'kd-real'",
     False),
    (["run", "--grid", "no-such-grid"], "no-such-grid", False),
    (["run", "--grid", "smoke", "--workers", "0"], "0 is not in the range", True),
    (["run", "--grid", "smoke", "--device", "tpu"], "bad device 'tpu'", False),
    (["run", "--grid", "smoke", "--iterations", "-3"], "-3 is not in the range", True),
    # tune
    ([*TUNE[:2], "nope", *TUNE[3:]], "unknown method 'nope'", False),
    ([*TUNE, "--params", "lr,momentum"], "unknown search parameter 'momentum'", False),
    ([*TUNE, "--dataset", "mnistx"], "unknown dataset 'mnistx'", False),
    ([*TUNE, "--teacher", "resnet18"], "no cached teacher for dataset 'mnist', arch 'resnet18'", False),
    ([*TUNE, "--student", "lenet9"], "unknown arch 'lenet9'", False),
    ([*TUNE, "--profile", "slow"], "unknown profile 'slow'", False),
    ([*TUNE[:-1], "tpu"], "bad device 'tpu'", False),
    ([*TUNE, "--trials", "0"], "0 is not in the range", True),
    # teachers
    (["teachers", "train", "--dataset", "mnistx", "--arch", "lenet5"], "unknown dataset 'mnistx'", False),
    (["teachers", "train", "--dataset", "mnist", "--arch", "lenet9"], "unknown arch 'lenet9'", False),
    (["teachers", "train", "--dataset", "mnist", "--arch", "lenet5"], "--force", False),  # cached: refuses to overwrite
    (["teachers", "train", "--dataset", "mnist", "--arch", "lenet5", "--epochs", "0"], "0 is not in the range", True),
    (["teachers", "list", "--device", "tpu"], "bad device 'tpu'", False),
    # table / plot on a results folder without a tracking store: refused, and no empty mlflow.db left behind
    (["table"], "no MLflow store at", False),
    (["table", "--experiment", "x", "--format", "xls"], "'xls' is not one of", True),
    (["plot", "sensitivity", "--param", "lambda_d"], "no MLflow store at", False),
    (["plot", "curves"], "no MLflow store at", False),
    (["plot", "samples"], "no MLflow store at", False),
    # ui
    (["ui", "--port", "0"], "0 is not in the range", True),
    (["ui", "--print-command", "--device", "tpu"], "bad device 'tpu'", False),
]


def _id(case) -> str:
    args = case[0]
    return " ".join(a for a in args if a not in DISTILL[1:] + TUNE[1:] + KD_COLLECTED[1:]) or args[0]


@pytest.mark.parametrize("args, message, usage", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, args: list[str], message: str, usage: bool) -> None:
    results, cwd, bad_grid, invoke = workspace
    args = [a.replace("{bad_grid}", str(bad_grid)) for a in args]
    before = snapshot(results, cwd)
    out = invoke(*args)
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    lines = [line for line in out.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, out.output
    assert message in errors[0], out.output
    if not usage:
        assert lines == errors, out.output  # our errors are one line, without click's usage text
    assert snapshot(results, cwd) == before  # nothing written: no store, no queue, no tables, no teacher
    assert not (results / "mlflow.db").exists()


# ----------------------------------------------------------------------------- a teacher file torch refuses
class Payload:
    """Unpickling this calls ``Path.touch(marker)``: code a weights file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("command", ["distill", "tune"])
def test_teacher_file_with_code_is_one_line_naming_the_file_and_the_fix(workspace, tmp_path: Path, command: str) -> None:
    results, cwd, _, invoke = workspace
    folder = teacher_dir(results, "mnist", "lenet5")
    weights = folder / "weights.pt"
    marker = tmp_path / "code-ran"
    state = torch.load(weights, weights_only=True)
    state["conv1.0.weight"] = Payload(marker)
    torch.save(state, weights)
    with pytest.raises(pickle.UnpicklingError):  # what load_teacher meets
        torch.load(weights, weights_only=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # the checksum matches the bad file
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(results, cwd)
    args = {"distill": [*KD_COLLECTED], "tune": [*TUNE]}[command]
    out = invoke(*args)
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.output, out.output
    assert str(weights) in lines[0]
    assert "retrain with: dfkd-bench teachers train --dataset mnist --arch lenet5 --force" in lines[0]
    assert not marker.exists()  # the payload never ran
    assert snapshot(results, cwd) == before


# ----------------------------------------------------------------------------- declared ranges
def _numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis)


METHODS = method_names()


@pytest.mark.parametrize("method", METHODS)
def test_every_numeric_hyperparameter_declares_its_range(method: str) -> None:
    cls = get_method(method)
    hints = typing.get_type_hints(cls.Hparams)
    missing = [f.name for f in dataclasses.fields(cls.Hparams)
               if hints[f.name] is not bool and _numeric(hints[f.name]) and f.metadata.get("range", Range()) == Range()]
    assert not missing, f"{method}: no hp(..., ge=/gt=/le=/lt=) range for {missing}"
    # the defaults and every profile lie inside the ranges (resolve_hparams checks them)
    for profile, per_dataset in cls.profiles.items():
        for dataset in per_dataset:
            cls.resolve_hparams(profile, "mnist" if dataset == "*" else dataset)


@pytest.mark.parametrize("method", method_names())
def test_search_space_lies_within_the_declared_ranges(method: str) -> None:
    cls = get_method(method)
    hints = typing.get_type_hints(cls.Hparams)
    fields = {f.name: f for f in dataclasses.fields(cls.Hparams)}
    for name, dist in cls.search_space.items():
        assert name in fields, f"{method}: search parameter {name!r} is no hyperparameter"
        allowed: Range = fields[name].metadata.get("range", Range())
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            values = [dist.low, dist.high]
        else:
            assert isinstance(dist, CategoricalDistribution)
            values = list(dist.choices)
        for value in values:
            typed = coerce_value(name, value, hints[name])
            if isinstance(typed, (int, float)) and not isinstance(typed, bool):
                assert allowed.admits(typed), f"{method}: {name}={value!r} outside {allowed.describe()}"


def test_tuning_samples_go_through_the_range_check(monkeypatch, workspace) -> None:
    """A search space reaching outside a declared range: the trial fails with the one-line range error."""
    from benchmark import tune as tune_module

    seen: list[str] = []
    real = tune_module.Tuner.objective

    def objective(self, trial):
        try:
            return real(self, trial)
        except Exception as error:
            seen.append(str(error))
            raise

    cls = get_method("kd-collected")
    monkeypatch.setattr(cls, "search_space", {"lr": FloatDistribution(-1.0, -0.5)})
    monkeypatch.setattr(tune_module.Tuner, "objective", objective)
    results, _, _, invoke = workspace
    invoke(*TUNE)
    assert seen and "for hyperparameter 'lr' of method 'kd-collected'; allowed: > 0" in seen[0], seen

