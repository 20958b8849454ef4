"""``dfkd-bench reproduce`` and the packaged references (spec §5): values, verdicts, dry run, a tiny real run."""
from __future__ import annotations

import configparser
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmark import tracking
from benchmark.cli import main
from benchmark.references import ReferencesError, load_references, parse_references, verdict
from benchmark.reproduce import Comparison, Request, plan_for, precision, resolve, summarize
from benchmark.runner import CellRow

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str, results: Path, data_root: Path):
    return CliRunner().invoke(main, list(args), env={"DFKD_RESULTS": str(results), "DFKD_DATA": str(data_root)})


def entry(method: str | None, dataset: str | None, pair: str | None, source_part: str):
    found = [e for e in load_references().entries
             if e.method == method and e.dataset == dataset and e.pair == pair and source_part in e.source]
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------- the references file
def test_references_hold_the_spec_values_with_source_and_teacher() -> None:
    # Numbers copied by hand from spec §5.1-5.3.
    dfad = entry("dfad", "mnist", "lenet5->lenet5-half", "DFAD Table 2")
    assert (dfad.value, dfad.spread, dfad.teacher_value) == (98.3, 0.2, 98.9)
    assert (dfad.student, dfad.paper_pair, dfad.primary) == ("lenet5-half", "LeNet-5 -> LeNet-5-half", True)
    assert "[spec §5.1]" in dfad.source
    c100 = entry("dfad", "cifar100", "resnet34->resnet18", "DFAD Table 2")
    assert (c100.value, c100.spread, c100.teacher_value, c100.student) == (67.7, 0.3, 77.5, "resnet18")
    kd_ori = entry("kd-real", "mnist", "lenet5->lenet5-half", "DFAD Table 2")
    assert (kd_ori.paper_method, kd_ori.value, kd_ori.spread) == ("KD-ORI", 98.8, 0.1)
    dafl = entry("dafl", "mnist", "lenet5->lenet5-half", "DAFL Table 1")
    assert (dafl.value, dafl.spread, dafl.teacher_value, dafl.primary) == (98.20, None, 98.91, True)
    assert "[spec §5.2]" in dafl.source
    rerun = entry("dafl", "mnist", "lenet5->lenet5-half", "DFAD Table 2")
    assert (rerun.value, rerun.spread, rerun.primary) == (98.1, 0.1, False) and "256" in rerun.notes
    cmi = entry("cmi", "cifar10", "resnet34->resnet18", "CMI benchmark")
    assert (cmi.value, cmi.teacher_value, cmi.student, cmi.primary) == (94.84, 95.70, "resnet18", True)
    assert "[spec §5.3]" in cmi.source
    wrn = entry("cmi", "cifar100", "wrn-40-2->wrn-16-2", "CMI benchmark")
    assert (wrn.value, wrn.teacher_value, wrn.paper_pair) == (68.75, 75.83, "WRN-40-2 -> WRN-16-2")
    vgg = entry("zskt", "cifar100", "vgg11-bn->resnet18", "[spec §5.3]")
    assert (vgg.value, vgg.teacher_value) == (34.72, 71.32)
    failed = [e for e in load_references().entries if e.method == "dafl" and e.paper_dataset == "Caltech101"]
    assert len(failed) == 1 and failed[0].value is None and "failed" in failed[0].notes


def test_references_cover_spec_5_1_to_5_3() -> None:
    refs = load_references()
    by_section = {s: [e for e in refs.entries if f"[spec §{s}]" in e.source] for s in ("5.1", "5.2", "5.3")}
    # §5.1: 6 rows below the teacher × 4 columns; §5.2: 6 rows × 4 columns minus Meta-data's two "–";
    # §5.3: 6 rows × 5 pairs × 2 datasets.
    assert {s: len(v) for s, v in by_section.items()} == {"5.1": 24, "5.2": 22, "5.3": 60}
    assert all(e.source for e in refs.entries)
    unavailable = {u.method: u.reason for u in refs.unavailable}
    assert set(unavailable) == {"hidfd", "cgdd", "cpsc"}
    assert all("no verified reference (spec §5.7)" in r for r in unavailable.values())
    assert not [e for e in refs.entries if e.method in unavailable]


def test_references_file_is_package_data() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "references.yaml" in cfg["options.package_data"]["benchmark"]


BAD_REFERENCES = [
    ({"value": 101}, "bad value 101; allowed: a number in [0, 100]"),
    ({"method": "dfadx"}, "unknown name 'dfadx'"),
    ({"student": None}, "give both teacher and student archs, or neither"),
    ({"value": None, "notes": ""}, "value is null; say why in 'notes'"),
    ({"colour": 1}, "unknown key 'colour'"),
]
GOOD = {"paper_method": "DFAD", "method": "dfad", "paper_dataset": "MNIST", "dataset": "mnist", "paper_pair": "a -> b",
        "teacher": "lenet5", "student": "lenet5-half", "value": 98.3, "spread": 0.2, "teacher_value": 98.9,
        "source": "DFAD Table 2 [spec §5.1]", "primary": True}


@pytest.mark.parametrize("change,message", BAD_REFERENCES)
def test_bad_references_give_one_line_errors(change: dict, message: str) -> None:
    with pytest.raises(ReferencesError) as error:
        parse_references({"references": [{**GOOD, **change}]}, "x.yaml")
    assert message in str(error.value) and "\n" not in str(error.value) and "x.yaml" in str(error.value)


def test_references_refuse_two_primaries_and_numbers_for_unavailable_methods() -> None:
    with pytest.raises(ReferencesError, match="a second primary entry for dfad mnist"):
        parse_references({"references": [GOOD, GOOD]})
    with pytest.raises(ReferencesError, match="also has numbered entries"):
        parse_references({"references": [{**GOOD, "method": "hidfd", "primary": False}],
                          "unavailable": [{"method": "hidfd", "paper_method": "HiDFD", "reason": "none"}]})


# ----------------------------------------------------------------------------- the verdict
def test_verdict_rule_on_hand_made_numbers() -> None:
    assert verdict(98.2, 98.3, 0.2) == "within"
    assert verdict(98.5, 98.3, 0.2) == "within"  # on the edge (98.5 − 98.3 is 0.2000…03 in floats)
    assert verdict(98.0, 98.3, 0.2) == "below"
    assert verdict(98.6, 98.3, 0.2) == "above"
    assert verdict(93.3, 93.3, 0.0) == "within" and verdict(93.2, 93.3, 0.0) == "below"
    # No published spread: ±0.5 points.
    assert verdict(98.6, 98.2, None) == "within"
    assert verdict(97.7, 98.2, None) == "within"
    assert verdict(98.8, 98.2, None) == "above"
    assert verdict(97.6, 98.2, None) == "below"


def _rows(target, values):
    cells = plan_for(target).cells
    return [CellRow(cell, "FINISHED", {"test_accuracy": last, "best_val_test_accuracy": best, "teacher_accuracy": 0.99,
                                       "wall_seconds": wall}, f"run{i}")
            for i, (cell, (last, best, wall)) in enumerate(zip(cells, values))]


def test_comparison_on_hand_made_runs() -> None:
    target = resolve(Request("dfad", "mnist", (0, 1)), load_references())
    ours = summarize(_rows(target, [(0.978, 0.981, 10.0), (0.980, 0.983, 14.0)]))
    # Hand-computed: last 97.8, 98.0 → 97.9 ± 0.1414; best-val 98.1, 98.3 → 98.2 ± 0.1414; wall 12 s.
    assert ours.last.mean == pytest.approx(97.9) and ours.last.std == pytest.approx(0.141421, abs=1e-5)
    assert ours.best_val.mean == pytest.approx(98.2) and ours.wall.mean == pytest.approx(12.0)
    comparison = Comparison(target, ours, "test CPU")
    assert comparison.verdicts == {"best_val": "within", "last": "below"}  # |98.2 − 98.3| ≤ 0.2; 97.9 < 98.1
    assert comparison.ours_gap["best_val"] == pytest.approx(0.8) and comparison.ours_gap["last"] == pytest.approx(1.1)
    record = comparison.to_dict()
    assert record["reference"]["teacher_gap"] == pytest.approx(0.6)  # 98.9 − 98.3
    assert record["reference"]["source"] == "DFAD Table 2 [spec §5.1]" and record["verdict"]["tolerance"] == 0.2
    text = comparison.text()
    assert "best-val 98.20 ± 0.14" in text and "last 97.90 ± 0.14" in text and "teacher 99.00" in text
    assert "paper: DFAD Table 2 [spec §5.1]: DFAD, MNIST LeNet-5 -> LeNet-5-half: 98.30 ± 0.20 (teacher 98.90)" in text
    assert "gap to teacher: ours 0.80 (best-val) / 1.10 (last); paper 0.60" in text
    assert "verdict: within" in text and "last: below" in text
    table = comparison.markdown().splitlines()
    assert len(table) == 3 and table[0].startswith("| Method | Dataset | Pair | Ours last | Ours best-val | Seeds")
    assert table[2] == ("| dfad | mnist | lenet5->lenet5-half | 97.90 ± 0.14 | 98.20 ± 0.14 | 2 (0,1) | "
                        "98.30 ± 0.20 (DFAD Table 2 [spec §5.1]) | 0.80 (T 99.00) | 0.60 (T 98.90) | within | test CPU, fp32 | 12 s |")
    assert table[0].count("|") == table[2].count("|")
    # Without a spread (DAFL's own MNIST number, 98.20): ±0.5.
    dafl = resolve(Request("dafl", "mnist", (0,)), load_references())
    assert Comparison(dafl, summarize(_rows(dafl, [(0.975, 0.978, 1.0)])), "cpu").verdicts == {
        "best_val": "within", "last": "below"}  # 97.8 is within 98.20 ± 0.5; 97.5 is below


def test_precision_follows_the_amp_rule() -> None:
    # --amp auto: bf16 autocast on CUDA, fp32 on CPU; bf16 forces it on the CPU; off never.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [precision(a, cpu) for a in ("auto", "bf16", "off")] == ["fp32", "bf16", "fp32"]
    assert [precision(a, cuda) for a in ("auto", "bf16", "off")] == ["bf16", "bf16", "fp32"]


@pytest.mark.parametrize("method", ["hidfd", "cgdd", "cpsc"])
def test_methods_without_verified_numbers_say_so(method: str) -> None:
    target = resolve(Request(method, "mnist", (0,)), load_references())
    assert target.reference is None and target.reference_status == "unavailable"
    comparison = Comparison(target, summarize(_rows(target, [(0.9, 0.91, 1.0)])), "cpu")
    assert comparison.verdicts is None
    text = comparison.text()
    assert "paper: no verified reference (spec §5.7)" in text and "verdict: none" in text
    assert "no verified reference (spec §5.7)" in comparison.markdown_row()
    assert comparison.to_dict()["verdict"] is None and comparison.to_dict()["reference"] is None


# ----------------------------------------------------------------------------- the command
def test_list_prints_every_reference(tmp_path: Path, data_root: Path) -> None:
    out = invoke("reproduce", "--list", results=tmp_path, data_root=data_root)
    assert out.exit_code == 0, out.output
    text = out.output
    assert "98.30 ± 0.20" in text and "DFAD Table 2 [spec §5.1]" in text
    assert "98.20" in text and "DAFL Table 1 [spec §5.2]" in text
    assert "94.84" in text and "CMI benchmark README, CIFAR-10 table [spec §5.3]" in text
    for method in ("hidfd", "cgdd", "cpsc"):
        assert any(line.split()[:1] == [method] and "no verified reference (spec §5.7)" in line
                   for line in text.splitlines())
    listed = json.loads(invoke("reproduce", "--list", "--json", results=tmp_path, data_root=data_root).stdout)
    assert len(listed["references"]) == len(load_references().entries)
    assert {u["method"] for u in listed["unavailable"]} == {"hidfd", "cgdd", "cpsc"}
    assert not list(tmp_path.iterdir())


def test_dry_run_lists_cells_and_reference_and_trains_nothing(tmp_path: Path, data_root: Path) -> None:
    results = tmp_path / "empty"
    out = invoke("reproduce", "--method", "dfad", "--dataset", "mnist", "--dry-run", results=results, data_root=data_root)
    assert out.exit_code == 0, out.output
    text = out.output
    for seed in (0, 1, 2):  # spec §3.1 MNIST recipe: B 512, 2,000 iterations
        assert f"dfad mnist lenet5->lenet5-half c0 s{seed}  iterations 2000, batch size 512" in text
    assert "reference: DFAD Table 2 [spec §5.1]: DFAD, MNIST LeNet-5 -> LeNet-5-half: 98.30 ± 0.20 (teacher 98.90)" in text
    assert "teacher mnist/lenet5: not cached; a real run trains it first" in text and "nothing trained" in text
    assert "experiment reproduce-dfad-mnist" in text
    record = json.loads(invoke("reproduce", "--method", "dfad", "--dataset", "mnist", "--dry-run", "--json",
                               "--seeds", "0", results=results, data_root=data_root).stdout)
    assert [c["seed"] for c in record["cells"]] == [0] and record["cells"][0]["hparams"]["iterations"] == 2000
    assert record["reference"]["value"] == 98.3 and record["reference"]["source"] == "DFAD Table 2 [spec §5.1]"
    assert record["teachers"] == [{"teacher": "mnist/lenet5", "cached": False, "test_accuracy": None,
                                   "path": str(results / "teachers" / "mnist" / "lenet5")}]
    assert not results.exists()  # nothing written: no store, no queue, no teacher


def test_dry_run_of_a_method_that_needs_collected_examples(tmp_path: Path, data_root: Path) -> None:
    out = invoke("reproduce", "--method", "hidfd", "--dataset", "mnist", "--dry-run", "--seeds", "0",
                 results=tmp_path, data_root=data_root)
    assert out.exit_code == 0, out.output
    assert "hidfd mnist lenet5->lenet5-half c5000 s0" in out.output  # spec §3.2 n_collect default
    assert "reference: no verified reference (spec §5.7)" in out.output
    smaller = invoke("reproduce", "--method", "hidfd", "--dataset", "mnist", "--dry-run", "--seeds", "0",
                     "--collected", "500", results=tmp_path, data_root=data_root)
    assert "c500 s0" in smaller.output


BAD_INPUT = [
    (["--method", "nope", "--dataset", "mnist"], "unknown method 'nope'; allowed:"),
    (["--method", "dfad", "--dataset", "mnistx"], "unknown dataset 'mnistx'; allowed:"),
    (["--method", "dfad", "--dataset", "mnist", "--seeds", "0,x"], "bad --seeds '0,x'"),
    (["--method", "dfad", "--dataset", "mnist", "--seeds", ""], "bad --seeds ''"),
    (["--method", "dfad", "--dataset", "mnist", "--seeds", "-1"], "bad --seeds '-1'"),
    (["--method", "dfad", "--dataset", "mnist", "--seeds", "1,1"], "seed 1 listed twice"),
    (["--method", "dfad", "--dataset", "svhn"], "no reference and no known pair for dfad on svhn"),
    (["--method", "dfad", "--dataset", "mnist", "--collected", "10"], "is data-free and takes no collected examples"),
    (["--method", "kd-collected", "--dataset", "mnist", "--collected", "0"], "needs collected examples"),
    (["--method", "cgdd", "--dataset", "fashion-mnist"], "has no recipe for dataset 'fashion-mnist'"),
    (["--method", "dfad", "--dataset", "mnist", "--pair", "lenet5"], "bad --pair 'lenet5'"),
    (["--method", "dfad", "--dataset", "mnist", "--pair", "lenet5->lenet9"], "unknown arch 'lenet9'"),
    (["--method", "dfad"], "give --method and --dataset"),
    (["--list", "--json", "--markdown"], "give --json or --markdown, not both"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, data_root: Path, args: list[str], message: str) -> None:
    out = invoke("reproduce", *args, "--dry-run", results=tmp_path / "r", data_root=data_root)
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], out.output
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- a tiny real run
def test_tiny_run_compares_numbers_read_back_from_mlflow(tmp_path: Path, results_dir: Path, data_root: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(results_dir / "teachers", results / "teachers")
    args = ("reproduce", "--method", "dfad", "--dataset", "mnist", "--seeds", "0,1", "--iterations", "2",
            "--batch-size", "32", "--device", "cpu", "--threads", "1")
    out = invoke(*args, "--json", results=results, data_root=data_root)
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["experiment"] == "reproduce-dfad-mnist-i2-b32"
    assert record["recipe_overridden"] == {"iterations": 2, "batch_size": 32}

    client = tracking.open_client(tracking.default_tracking_uri(results))
    exp = tracking.find_experiment(client, "reproduce-dfad-mnist-i2-b32")
    runs = {int(r.data.tags["seed"]): r for r in tracking.cell_runs(client, exp)}
    assert sorted(runs) == [0, 1] and all(r.info.status == "FINISHED" for r in runs.values())
    assert all(r.data.params["hp.iterations"] == "2" and r.data.params["hp.batch_size"] == "32" for r in runs.values())
    last = [100 * runs[s].data.metrics["test_accuracy"] for s in (0, 1)]
    best = [100 * runs[s].data.metrics["best_val_test_accuracy"] for s in (0, 1)]
    teacher = 100 * runs[0].data.metrics["teacher_accuracy"]
    ours = record["ours"]
    assert ours["finished_seeds"] == [0, 1]
    assert ours["last"]["mean"] == pytest.approx(statistics.fmean(last))
    assert ours["last"]["std"] == pytest.approx(statistics.stdev(last))
    assert ours["best_val"]["mean"] == pytest.approx(statistics.fmean(best))
    assert ours["teacher"] == pytest.approx(teacher)
    assert ours["gap_to_teacher"]["best_val"] == pytest.approx(teacher - statistics.fmean(best))
    assert record["reference"]["value"] == 98.3 and record["reference"]["teacher_gap"] == pytest.approx(0.6)
    mean = statistics.fmean(best)
    expected = "within" if abs(mean - 98.3) <= 0.2 else ("below" if mean < 98.3 else "above")
    assert record["verdict"]["best_val"] == expected
    assert record["hardware"] and record["precision"] == "fp32" and ours["wall_seconds_per_run"] > 0

    # A re-run trains nothing (both cells finished) and prints the comparison and the README row.
    text = invoke(*args, results=results, data_root=data_root)
    assert text.exit_code == 0, text.output
    assert "2 already finished" in text.output
    assert f"best-val {statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}" in text.stdout
    assert "paper: DFAD Table 2 [spec §5.1]" in text.stdout and "NOTE: not the paper recipe" in text.stdout
    row = invoke(*args, "--markdown", results=results, data_root=data_root).stdout.strip().splitlines()
    assert row[0].startswith("| Method |") and row[2].startswith("| dfad (smoke) | mnist | lenet5->lenet5-half |")
    assert len(tracking.cell_runs(client, exp)) == 2


@pytest.mark.slow
def test_a_sliced_reproduce_exits_75_and_the_same_command_continues(tmp_path: Path, results_dir: Path,
                                                                    data_root: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(results_dir / "teachers", results / "teachers")
    args = ("reproduce", "--method", "dfad", "--dataset", "mnist", "--seeds", "0", "--iterations", "3",
            "--batch-size", "16", "--device", "cpu", "--threads", "1")
    sliced = invoke(*args, "--stop-after", "0.001s", results=results, data_root=data_root)
    assert sliced.exit_code == 75, sliced.output
    assert list((results / "checkpoints").rglob("*.pt")), "the cut cell left no checkpoint"
    done = invoke(*args, "--json", results=results, data_root=data_root)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["ours"]["finished_seeds"] == [0]
    client = tracking.open_client(tracking.default_tracking_uri(results))
    runs = tracking.cell_runs(client, tracking.find_experiment(client, "reproduce-dfad-mnist-i3-b16"))
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run for the cell, continued
    assert not list((results / "checkpoints").rglob("*.pt"))  # a finished cell drops its checkpoint
