"""Resume inside a cell and time-sliced runs (spec §1.5, §6 "Sizing"; methods.core.checkpoint).

The property that matters: a run interrupted anywhere (SIGKILL, a time slice) and resumed from its
checkpoint ends with exactly the same student (``torch.equal`` on every tensor) as the same run
uninterrupted — CPU, same seed — and, in a grid, continues its own MLflow run.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmark import tracking, zoo
from benchmark.cli import main
from benchmark.experiment import RunSpec, execute
from benchmark.grid import expand, load_grid
from benchmark.runner import checkpoint_path, run_grid
from benchmark.settings import Settings
from methods import Budget, distill
from methods.core.checkpoint import CheckpointConfig, Checkpointer, file_sha256, fingerprint, once_path
from methods.core.context import BaseCallback
from methods.core.errors import EXIT_SLICE_ENDED, CheckpointError, SliceEnded

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]

HIDFD_TINY = {"gan_iterations": 4, "gan_log_every": 2, "gan_batch_size": 8, "gan_ch": 2, "n_synth": 40,
              "iterations": 4, "eval_every": 2, "batch_size": 16, "inflation": 1, "cfs_k": 2, "ema_start": 2}
INVERSION_TINY = {"iterations": 3, "eval_every": 2, "b_syn": 8, "g_steps": 3, "kd_steps": 3, "batch_size": 8}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_wall(history) -> list[tuple[int, dict[str, float]]]:
    return [(e.iteration, {k: v for k, v in e.metrics.items() if k != "wall_seconds"}) for e in history]


# ----------------------------------------------------------------------------- in-process time slices
@pytest.mark.parametrize(("method", "bn", "collected", "overrides"), [
    ("kd-collected", False, 50, {"iterations": 5, "eval_every": 2, "batch_size": 16}),
    ("adi", True, 0, INVERSION_TINY),
    ("dafl", False, 0, {"iterations": 4, "eval_every": 2, "batch_size": 16}),
    ("hidfd", False, 50, HIDFD_TINY),
])
def test_a_run_sliced_after_every_iteration_ends_as_the_uninterrupted_run(
        method, bn, collected, overrides, mnist, lenet5_teacher, lenet5_bn_teacher, tmp_path) -> None:
    """A deadline already passed stops the run after each iteration (most of them between evaluations, so the
    loss sums travel too; HiDFD also at its synthesis boundary); resuming every time ends identically."""
    teacher = lenet5_bn_teacher if bn else lenet5_teacher

    def run(checkpoint: CheckpointConfig | None = None):
        torch.manual_seed(0)
        student = zoo.build("lenet5-half", 10, 1)
        return distill(teacher, student, Budget(collected=collected), method=method, data=mnist, profile="quick",
                       overrides=overrides, seed=0, device="cpu", checkpoint=checkpoint)

    reference = run()
    path = tmp_path / "run.pt"
    slices = 0
    while True:
        try:
            resumed = run(CheckpointConfig(path, resume=True, deadline=0.0))
            break
        except SliceEnded:
            slices += 1
            assert path.is_file()
    stages = overrides["iterations"] + overrides.get("gan_iterations", 0)
    assert slices == stages
    assert same_weights(reference.student, resumed.student)
    assert same_weights(reference.predictor, resumed.predictor)
    assert without_wall(reference.history) == without_wall(resumed.history)
    assert reference.best_iteration == resumed.best_iteration and reference.teacher_images == resumed.teacher_images
    timing = ("seconds", "per_second")
    assert ({k: v for k, v in reference.accounting.items() if not k.endswith(timing)}
            == {k: v for k, v in resumed.accounting.items() if not k.endswith(timing)})
    assert not list(tmp_path.glob("run.pt*"))  # a finished run drops its checkpoint and its product files


# ----------------------------------------------------------------------------- once products
def test_a_once_product_is_written_once_to_its_own_file_and_checked_on_resume(tmp_path) -> None:
    """HiDFD's synthetic set (``ctx.once``) is one uint8 file written at the stage boundary: later checkpoints
    name it (file + sha256) instead of re-serialising it; a resume reads it back; a changed or missing product
    file is refused with one line; a format-1 checkpoint (product inline) is still read."""
    path = tmp_path / "run.pt"
    images = torch.randint(0, 256, (4000, 1, 32, 32), dtype=torch.uint8)
    fp = fingerprint(method="x", seed=0)

    def checkpointer(resume: bool = False) -> Checkpointer:
        return Checkpointer(CheckpointConfig(path, resume=resume), fp, lambda: {}, lambda state: None)

    calls = []
    first = checkpointer()
    net = torch.nn.Linear(2, 2)
    first.keep({"net": net})
    assert first.once("synthetic", lambda: calls.append(1) or {"images": images})["images"] is images
    product = once_path(path, "synthetic")
    assert product.is_file() and calls == [1]
    before = product.stat().st_mtime_ns
    for it in first.steps(3, "main", every=1):
        net.weight.data += it
    assert product.stat().st_mtime_ns == before  # never rewritten
    assert path.stat().st_size < images.numel() / 10  # the checkpoint holds a reference, not the images
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["once"]["synthetic"] == {"file": product.name, "sha256": file_sha256(product)}

    second = checkpointer(resume=True)
    second.keep({"net": torch.nn.Linear(2, 2)})
    back = second.once("synthetic", lambda: pytest.fail("a resume must not recompute the product"))
    assert torch.equal(back["images"], images) and back["images"].dtype == torch.uint8

    raw = bytearray(product.read_bytes())
    raw[-200] ^= 0xFF
    product.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="was changed since") as error:
        checkpointer(resume=True).once("synthetic", dict)
    assert "\n" not in str(error.value)
    product.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        checkpointer(resume=True).once("synthetic", dict)

    legacy = {**saved, "format": 1, "once": {"synthetic": {"images": images}}}
    torch.save(legacy, path)
    third = checkpointer(resume=True)
    third.keep({"net": torch.nn.Linear(2, 2)})
    assert torch.equal(third.once("synthetic", dict)["images"], images) and product.is_file()
    third.remove()
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- SIGKILL, then resume
@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, results_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("resume") / "results"
    shutil.copytree(results_dir / "teachers", root / "teachers")
    return root


def position(path: Path) -> tuple[str, int] | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)["position"]
    except Exception:  # noqa: BLE001  (not written yet)
        return None
    return saved["name"], saved["iteration"]


def cli_args(spec: RunSpec, results: Path, data_root: Path) -> list[str]:
    args = ["distill", "--method", spec.method, "--dataset", spec.dataset, "--teacher", spec.teacher,
            "--student", spec.student, "--collected", str(spec.budget.collected), "--seed", str(spec.seed),
            "--results", str(results), "--data-dir", str(data_root), "--device", "cpu"]
    for key, value in spec.overrides:
        args += ["--set", f"{key}={value}"]
    return args


def kill_when(command: list[str], path: Path, ready, timeout: float = 120) -> tuple[str, int]:
    """Start ``command``; SIGKILL it as soon as its checkpoint's position satisfies ``ready``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "benchmark", *command], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            where = position(path) if path.exists() else None
            if where is not None and ready(*where):
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return where
            time.sleep(0.02)
        raise AssertionError(f"never killed mid-run (rc {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


DFAD = RunSpec("dfad", "mnist", "lenet5", "lenet5-half", Budget(), overrides=(
    ("iterations", 40), ("eval_every", 5), ("batch_size", 16), ("student_steps", 1), ("ngf", 8)))
HIDFD = RunSpec("hidfd", "mnist", "lenet5", "lenet5-half", Budget(collected=50), overrides=(
    ("gan_iterations", 30), ("gan_log_every", 5), ("gan_batch_size", 8), ("gan_ch", 2), ("n_synth", 40),
    ("iterations", 30), ("eval_every", 5), ("batch_size", 16), ("inflation", 1), ("cfs_k", 5), ("ema_start", 10)))
_REFERENCES: dict[tuple, object] = {}


def reference_run(spec: RunSpec, settings: Settings):
    """The uninterrupted run of ``spec`` (computed once per module; the grid's DFAD cell is ``DFAD``)."""
    key = (*spec.identity().values(), spec.budget, tuple(sorted(spec.overrides)))
    if key not in _REFERENCES:
        _REFERENCES[key] = execute(spec, settings)[0]
    return _REFERENCES[key]


class FirstIteration(BaseCallback):
    """The first main-stage iteration a run reports (a resumed run starts after its checkpoint)."""

    def __init__(self) -> None:
        self.first: int | None = None

    def on_progress(self, iteration: int, total: int) -> None:
        if self.first is None:
            self.first = iteration


def resume_and_compare(spec: RunSpec, settings: Settings, path: Path, first: int) -> None:
    """Resume ``path`` in-process; it must start at iteration ``first`` and end as the uninterrupted run."""
    spy = FirstIteration()
    resumed, _ = execute(spec, settings, callbacks=[spy], checkpoint=CheckpointConfig(path, resume=True))
    assert spy.first == first  # resumed, not restarted
    reference = reference_run(spec, settings)
    assert same_weights(reference.student, resumed.student)
    assert same_weights(reference.predictor, resumed.predictor)
    assert without_wall(reference.history) == without_wall(resumed.history)
    assert reference.teacher_images == resumed.teacher_images
    assert not path.exists()


@pytest.mark.slow
def test_dfad_killed_with_sigkill_mid_run_resumes_to_the_same_student(results, data_root, tmp_path) -> None:
    path = tmp_path / "cell.pt"
    command = [*cli_args(DFAD, results, data_root), "--checkpoint", str(path), "--resume"]
    name, iteration = kill_when(command, path, lambda name, it: 5 <= it < 35)  # past the first evaluation
    resume_and_compare(DFAD, Settings(results, data_root, "cpu"), path, iteration + 1)


@pytest.mark.slow
def test_hidfd_killed_in_its_gan_stage_and_in_its_student_stage_resumes_to_the_same_student(
        results, data_root, tmp_path) -> None:
    path = tmp_path / "cell.pt"
    command = [*cli_args(HIDFD, results, data_root), "--checkpoint", str(path), "--resume"]
    kill_when(command, path, lambda name, it: name == "gan" and 5 <= it < 25)
    # the same command continues (the GAN-stage resume itself is checked bit-exactly, slice by slice, in
    # test_a_run_sliced_after_every_iteration_ends_as_the_uninterrupted_run[hidfd]), synthesizes once, and
    # is killed again in the student stage
    name, iteration = kill_when(command, path, lambda name, it: name == "main" and 5 <= it < 25)
    resume_and_compare(HIDFD, Settings(results, data_root, "cpu"), path, iteration + 1)


# ----------------------------------------------------------------------------- refusals (one line, exit 2)
def test_existing_corrupt_truncated_and_foreign_checkpoints_are_refused_with_one_line(results, data_root,
                                                                                      tmp_path) -> None:
    spec = RunSpec("dfad", "mnist", "lenet5", "lenet5-half", Budget(), overrides=(
        ("iterations", 6), ("eval_every", 2), ("batch_size", 16), ("student_steps", 1)))
    path = tmp_path / "run.pt"
    base = [*cli_args(spec, results, data_root), "--checkpoint", str(path)]
    runner = CliRunner()
    stopped = runner.invoke(main, [*base, "--stop-after", "0.001s"])
    assert stopped.exit_code == EXIT_SLICE_ENDED, stopped.output
    assert path.is_file()
    good = path.read_bytes()

    def refused(args: list[str], *words: str) -> None:
        before = path.read_bytes()
        result = runner.invoke(main, args)
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert all(w in lines[0] for w in (str(path), *words)), lines[0]
        assert path.read_bytes() == before  # nothing overwritten

    refused(base, "exists", "--resume")
    refused([*base, "--resume", "--seed", "1"], "another run", "seed")  # foreign: other seed
    path.write_bytes(good[: len(good) // 2])
    refused([*base, "--resume"], "truncated or corrupt")
    path.write_bytes(b"not a checkpoint at all\n" * 10)
    refused([*base, "--resume"], "truncated or corrupt")
    path.write_bytes(good)
    assert runner.invoke(main, [*base, "--resume", "--json"]).exit_code == 0
    assert not path.exists()
    bad = runner.invoke(main, [*base, "--stop-after", "5q"])
    assert bad.exit_code == 2 and "bad --stop-after '5q'" in bad.output


# ----------------------------------------------------------------------------- grids
GRID = """\
name: {name}
seeds: [0]
budgets: [0]
datasets: [mnist]
methods:
  - {{name: dfad, overrides: {{iterations: 40, eval_every: 5, batch_size: 16, student_steps: 1, ngf: 8}}}}
"""


def grid_file(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(GRID.format(name=name))
    return path


def one_cell_run(results: Path, grid: str):
    client = tracking.open_client(tracking.default_tracking_uri(results))
    exp = tracking.find_experiment(client, grid)
    runs = tracking.search(client, exp, "tags.`dfkd.kind` = 'cell'")
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]  # one MLflow run per cell, always
    return client, runs[0]


@pytest.mark.slow
def test_grid_killed_mid_cell_resumes_the_cell_and_its_mlflow_run(results, data_root, tmp_path) -> None:
    grid = grid_file(tmp_path, "killed")
    plan = expand(load_grid(grid))
    path = checkpoint_path(results, "killed", plan.cells[0].cell_id)
    command = ["run", "--grid", str(grid), "--results", str(results), "--device", "cpu", "--heartbeat", "1"]
    _, killed_at = kill_when(command, path, lambda name, it: 10 <= it < 35)
    client, run = one_cell_run(results, "killed")
    assert run.info.status == "RUNNING"  # SIGKILL: nothing could end it
    outcome = run_grid(plan, Settings(results, data_root, "cpu"), heartbeat=1, echo=lambda line: None)
    assert outcome.exit_code == 0, [(r.cell.label, r.status, r.error) for r in outcome.rows]
    client, again = one_cell_run(results, "killed")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["dfkd.resumes"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(set(steps)) == list(range(5, 41, 5))
    # no restart from step 1: what the checkpoint covered was logged once (later evaluations of the killed
    # process, logged before it died, may appear twice)
    assert collections.Counter(s for s in steps if s <= killed_at) == {s: 1 for s in range(5, killed_at + 1, 5)}
    assert not path.exists()
    # and the cell's student (student.pt in its run) is the uninterrupted run's, bit for bit
    saved = tracking.load_checkpoint(client, run.info.run_id)["predictor"]
    reference = reference_run(plan.cells[0].spec, Settings(results, data_root, "cpu")).predictor.state_dict()
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)


@pytest.mark.slow
def test_stop_after_exits_75_and_the_same_command_finishes_the_grid(results, data_root, tmp_path) -> None:
    grid = grid_file(tmp_path, "sliced")
    plan = expand(load_grid(grid))
    path = checkpoint_path(results, "sliced", plan.cells[0].cell_id)
    command = ["run", "--grid", str(grid), "--results", str(results), "--data-dir", str(data_root),
               "--device", "cpu", "--threads", "1"]
    runner = CliRunner()
    # A slice shorter than the setup still makes progress: the cell stops after one iteration each time.
    for expected in (1, 2):
        first = runner.invoke(main, [*command, "--stop-after", "0.001s"])
        assert first.exit_code == EXIT_SLICE_ENDED, first.output
        assert "run the same command again" in first.output
        _, run = one_cell_run(results, "sliced")
        assert run.info.status == "KILLED" and position(path) == ("main", expected)
    second = runner.invoke(main, command)
    assert second.exit_code == 0, second.output
    client, again = one_cell_run(results, "sliced")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(5, 41, 5))
    assert not path.exists()
    assert runner.invoke(main, [*command, "--stop-after", "0m"]).exit_code == 2
