"""The CLI: help, methods, teachers, distill --json, and one-line errors with exit code 2 that write nothing."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from benchmark.cli import main


@pytest.fixture()
def cli(results_dir, data_root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(results_dir, results)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), env={"DFKD_RESULTS": str(results), "DFKD_DATA": str(data_root)})

    invoke.results = results
    return invoke


def test_help_and_methods(cli):
    assert cli("--help").exit_code == 0
    out = cli("methods")
    assert out.exit_code == 0 and "kd-collected" in out.output and "search space" in out.output
    listed = json.loads(cli("methods", "--json").output)
    kd = next(m for m in listed if m["name"] == "kd-collected")
    assert kd["collected"] == "required" and kd["hparams"]["objective"] == "simkd" and "lr" in kd["search_space"]


def test_teachers_list(cli):
    found = json.loads(cli("teachers", "list", "--json").output)
    assert {m["arch"] for m in found} == {"lenet5", "lenet5-bn"}
    table = cli("teachers", "list").output
    assert "lenet5" in table and "sha256" in table


def test_distill_json(cli):
    out = cli("distill", "--method", "kd-collected", "--dataset", "mnist", "--teacher", "lenet5", "--student",
              "lenet5-half", "--collected", "50", "--iterations", "100", "--set", "eval_every=50", "--json",
              "--device", "cpu")
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("method", "dataset", "teacher", "student", "budget", "seed", "test_accuracy", "best_val_accuracy",
                "teacher_accuracy", "teacher_images", "wall_seconds"):
        assert key in record
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["budget"]["collected"] == 50
    assert record["teacher_images"] == 100 * 64
    history = record["history"]
    assert [h["iteration"] for h in history] == [50, 100]
    assert max(h["val_accuracy"] for h in history) == record["best_val_accuracy"]
    assert all(0.0 <= h["probe/agreement"] <= 1.0 and 0.0 <= h["probe/class_coverage"] <= 1.0 for h in history)


BAD = [
    (["--method", "nope"], "unknown method 'nope'; allowed:"),
    (["--dataset", "mnistx"], "unknown dataset 'mnistx'; allowed:"),
    (["--student", "lenet9"], "unknown arch 'lenet9'; allowed:"),
    (["--collected", "70000"], "collected budget 70000 exceeds the 54000 examples"),
    (["--method", "kd-real"], "trains on the labelled training set and takes no collected examples"),
    (["--set", "nope=1"], "unknown hyperparameter 'nope'"),
    (["--set", "lr=fast"], "bad value 'fast' for 'lr'; expected a number"),
    (["--set", "iterations=1.5"], "expected an integer"),
    (["--profile", "slow"], "unknown profile 'slow'"),
    (["--device", "tpu"], "bad device 'tpu'"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_values_exit_2_with_one_line(cli, change, message):
    args = {"--method": "kd-collected", "--dataset": "mnist", "--teacher": "lenet5", "--student": "lenet5-half",
            "--collected": "10", "--iterations": "5"}
    extra = []
    for key, value in zip(change[::2], change[1::2]):
        if key == "--set":
            extra += [key, value]
        else:
            args[key] = value
    before = sorted(p.relative_to(cli.results) for p in cli.results.rglob("*"))
    out = cli("distill", *[x for kv in args.items() for x in kv], *extra)
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.output
    assert "Traceback" not in out.output
    assert sorted(p.relative_to(cli.results) for p in cli.results.rglob("*")) == before


def test_negative_budget_is_a_usage_error(cli):
    out = cli("distill", "--method", "kd-collected", "--dataset", "mnist", "--teacher", "lenet5", "--student",
              "lenet5-half", "--collected", "-1")
    assert out.exit_code == 2 and "-1" in out.output


def test_missing_teacher_names_the_fix(cli, tmp_path):
    out = CliRunner().invoke(main, ["distill", "--method", "kd-collected", "--dataset", "mnist", "--teacher", "lenet5",
                                    "--student", "lenet5-half", "--collected", "10", "--results", str(tmp_path / "empty")])
    assert out.exit_code == 2
    assert "run: dfkd-bench teachers train --dataset mnist --arch lenet5" in out.output
    assert not (tmp_path / "empty").exists()


def test_teacher_train_refuses_to_overwrite(cli):
    out = cli("teachers", "train", "--dataset", "mnist", "--arch", "lenet5")
    assert out.exit_code == 2 and "--force" in out.output
