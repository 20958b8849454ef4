"""The grid runner: grid files, MLflow records, resume after crashes, several workers on one queue."""
from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torchvision.utils import make_grid

from benchmark import tracking
from benchmark.cli import main
from benchmark.grid import GridError, expand, load_grid, packaged_grids, parse_grid
from benchmark.runner import run_grid
from benchmark.settings import Settings
from benchmark.workqueue import open_storage
from methods import CollectedUse, CommonHparams, DistillContext, Method, get_method, method_names
from methods.core import registry

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, results_dir: Path) -> Path:
    """A results folder holding the session's cached 2-epoch teachers, shared by this module's runs.

    Each test runs its own grid (its own MLflow experiment and queue study), so sharing the store
    only saves creating the MLflow database once per test.
    """
    root = tmp_path_factory.mktemp("runner") / "results"
    shutil.copytree(results_dir / "teachers", root / "teachers")
    return root


def settings_for(results: Path, data_root: Path) -> Settings:
    return Settings(results, data_root, "cpu")


def client_for(results: Path):
    return tracking.open_client(tracking.default_tracking_uri(results))


def cell_runs(results: Path, grid: str):
    client = client_for(results)
    exp = tracking.find_experiment(client, grid)
    assert exp is not None
    return client, exp, tracking.cell_runs(client, exp)


def write_grid(folder: Path, text: str) -> Path:
    path = folder / "grid.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@dataclass
class ToyHparams(CommonHparams):
    iterations: int = 20
    batch_size: int = 32
    eval_every: int = 10
    lr: float = 0.05


class ToySamples(Method):
    """KD on Gaussian noise; adds a uint8 sample grid like the generator methods do."""

    Hparams = ToyHparams
    collected_use = CollectedUse.OPTIONAL

    def run(self, ctx: DistillContext) -> None:
        ctx.watch(ctx.student)
        opt = torch.optim.SGD(ctx.student.parameters(), lr=self.hp.lr)
        for i in range(1, ctx.iterations + 1):
            x = torch.randn(self.hp.batch_size, ctx.channels, ctx.size, ctx.size, device=ctx.device)
            with torch.no_grad():
                target = F.softmax(ctx.teacher(x), 1)
            loss = F.kl_div(F.log_softmax(ctx.student(x), 1), target, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctx.end_iteration(i, {"kd": self.scale(loss)})
        pixels = ctx.denormalize(x[:16]).clamp(0, 1)
        ctx.add_artifact("samples", (make_grid(pixels, nrow=4) * 255).to(torch.uint8))

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


class ToyNaN(ToySamples):
    """Its loss is NaN: the harness raises NonFiniteLossError at the first evaluation."""

    collected_use = CollectedUse.NONE

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan")


@pytest.fixture
def toy_methods():
    registry.register("toy-samples")(ToySamples)
    registry.register("toy-nan")(ToyNaN)
    yield
    registry._REGISTRY.pop("toy-samples", None)
    registry._REGISTRY.pop("toy-nan", None)


# ----------------------------------------------------------------------------- grid files
GOOD = {"name": "g", "datasets": ["mnist"], "methods": ["kd-real"]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nmae": "x"}, "unknown key 'nmae' at top level; allowed: name, description, profile"),
        ({"name": "bad name"}, "bad name 'bad name'; allowed: letters, digits"),
        ({"methods": ["dfax"]}, "methods[0].name: unknown method 'dfax'; allowed: all, " + ", ".join(method_names())),
        ({"methods": [{"name": "kd-real", "lr": 1}]}, "unknown key 'lr' at a method; allowed: name, profile, overrides"),
        ({"methods": [{"name": "kd-real", "overrides": {"lrr": 1}}]},
         "methods[0].overrides: unknown hyperparameter 'lrr' for method 'kd-real'; allowed: batch_size"),
        ({"methods": [{"name": "kd-real", "overrides": {"lr": "fast"}}]}, "bad value 'fast' for 'lr'; expected a number"),
        # grid overrides go through the same range check as --set (declared next to each default with hp())
        ({"methods": [{"name": "kd-real", "overrides": {"lr": -0.1}}]},
         "methods[0].overrides: bad value -0.1 for hyperparameter 'lr' of method 'kd-real'; allowed: >= 0"),
        ({"methods": [{"name": "kd-real", "overrides": {"lr": float("nan")}}]}, "bad value nan for hyperparameter 'lr'"),
        ({"methods": [{"name": "dfad", "overrides": {"batch_size": 0}}]},
         "bad value 0 for hyperparameter 'batch_size' of method 'dfad'; allowed: >= 1"),
        ({"methods": [{"name": "dfad", "overrides": {"student_steps": 0}}]},
         "bad value 0 for hyperparameter 'student_steps' of method 'dfad'; allowed: >= 1"),
        ({"methods": [{"name": "kd-real", "profile": "slow"}]},
         "methods[0].profile: unknown profile 'slow' for method 'kd-real'; allowed: quick, paper"),
        ({"methods": ["kd-real", "kd-real"]}, "method 'kd-real' listed twice"),
        ({"methods": []}, "methods: empty list"),
        ({"datasets": ["mnits"]}, "datasets[0]: unknown dataset 'mnits'; allowed: mnist, fashion-mnist"),
        ({"datasets": [{"name": "mnist", "pairs": ["lenet5->lenet7"]}]},
         "datasets[0].pairs[0]: unknown student arch 'lenet7'; allowed: lenet5"),
        ({"datasets": [{"name": "mnist", "pairs": ["lenet5"]}]}, "expected 'teacher->student'"),
        ({"budgets": [-1]}, "budgets[0]: bad value -1; allowed: an integer >= 0"),
        ({"budgets": [{"collected": 10, "pool": "x"}]}, "unknown key 'pool' at a budget; allowed: collected, source, balanced"),
        ({"seeds": ["zero"]}, "seeds[0]: expected an integer; got 'zero'"),
        ({"iterations": 0}, "iterations: bad value 0; allowed: an integer >= 1"),
        ({"amp": "fp8"}, "bad amp 'fp8'; allowed: auto, bf16, off"),
        ({"expected_seconds": {"dfda": 3}}, "expected_seconds: unknown method 'dfda'; allowed: " + ", ".join(method_names())),
        ({"expected_seconds": {"dfad": -1}}, "expected_seconds.dfad: bad value -1; allowed: a number of seconds >= 0"),
        ({"expected_seconds": [270]}, "expected_seconds: expected a mapping of method name to seconds per cell"),
    ],
)
def test_grid_errors_name_the_key_and_the_allowed_values(change: dict, message: str) -> None:
    with pytest.raises(GridError, match=None) as error:
        parse_grid({**GOOD, **change}, source="t.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("grid t.yaml")
    assert "\n" not in str(error.value)


def test_grid_file_errors(tmp_path: Path) -> None:
    with pytest.raises(GridError, match="not found; give a YAML file or one of the packaged grids: .*default"):
        load_grid(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(bad)
    result = CliRunner().invoke(main, ["run", "--grid", str(bad), "--dry-run", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_packaged_grids_parse() -> None:
    # Every grid the package ships, not a hand-picked list: a new grid file that does not parse fails here.
    names = sorted(packaged_grids())
    assert {"default", "smoke", "mnist-paper"} <= set(names)
    for name in names:
        plan = expand(load_grid(name))
        assert plan.cells and plan.grid.name == name


def test_cells_resolve_overrides_pairs_and_skips() -> None:
    grid = parse_grid({
        "name": "g", "iterations": 30, "seeds": [0, 1], "budgets": [0, 100],
        "datasets": [{"name": "mnist", "pairs": ["lenet5->lenet5-half", "lenet5-bn->lenet5-half"]}],
        "methods": [{"name": "kd-collected", "overrides": {"objective": "kd", "lr": "0.02"}, "budgets": [100]},
                    {"name": "kd-real", "iterations": 7, "pairs": {"mnist": "lenet5-bn->lenet5"}}],
    })
    plan = expand(grid)
    labels = [c.label for c in plan.cells]
    assert labels == [
        "kd-collected mnist lenet5->lenet5-half c100 s0", "kd-collected mnist lenet5->lenet5-half c100 s1",
        "kd-collected mnist lenet5-bn->lenet5-half c100 s0", "kd-collected mnist lenet5-bn->lenet5-half c100 s1",
        "kd-real mnist lenet5-bn->lenet5 c0 s0", "kd-real mnist lenet5-bn->lenet5 c0 s1",
    ]
    first = plan.cells[0]
    assert first.hparams["lr"] == 0.02 and first.hparams["objective"] == "kd" and first.hparams["iterations"] == 30
    assert plan.cells[-1].hparams["iterations"] == 7
    assert [s.label for s in plan.skipped] == ["kd-real mnist lenet5-bn->lenet5 c100 s0", "kd-real mnist lenet5-bn->lenet5 c100 s1"]
    assert "trains on the labelled training set and takes no collected examples" in plan.skipped[0].reason
    # Ids are stable, unique, survive the queue's round trip, and follow the resolved configuration.
    assert [c.cell_id for c in expand(grid).cells] == [c.cell_id for c in plan.cells]
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)
    assert type(first).from_dict(json.loads(json.dumps(first.to_dict()))).cell_id == first.cell_id
    assert expand(grid.with_iterations(31)).cells[0].cell_id != first.cell_id


def test_cells_are_queued_longest_expected_first(tmp_path: Path) -> None:
    # expected_seconds orders the queue only (longest-processing-time first, so no worker is left with a long
    # cell at the end): unlisted methods first, ties in plan order; the plan, the ids and the results are unchanged.
    grid = parse_grid({**GOOD, "seeds": [0, 1], "budgets": [0, 100], "methods": ["kd-collected", "hidfd", "dfad"],
                       "expected_seconds": {"kd-collected": 20, "hidfd": 120}})
    plan = expand(grid)
    assert [c.spec.method for c in plan.cells] == ["kd-collected"] * 2 + ["hidfd"] * 2 + ["dfad"] * 2
    order = plan.queue_order()
    assert [(c.spec.method, c.spec.seed) for c in order] == [
        ("dfad", 0), ("dfad", 1), ("hidfd", 0), ("hidfd", 1), ("kd-collected", 0), ("kd-collected", 1)]
    assert sorted(c.cell_id for c in order) == sorted(c.cell_id for c in plan.cells)
    # the queue the workers pop (WAITING trials in enqueue order) follows it
    from benchmark.runner import prepare

    storage = f"sqlite:///{tmp_path / 'queue.db'}"
    settings = Settings(results=tmp_path, data_dir=tmp_path, device="cpu")
    prepared = prepare(plan, settings, f"sqlite:///{tmp_path / 'mlflow.db'}", storage, 60, 2, ())
    import optuna

    study = optuna.load_study(study_name=prepared.config.study, storage=open_storage(storage, 60))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.user_attrs["cell_id"] for t in trials] == [c.cell_id for c in order]
    # and the default grid carries this machine's measured cost per method, longest (dfad) first
    default = expand(load_grid("default"))
    assert dict(default.grid.expected_seconds).keys() == set(method_names())
    assert default.queue_order()[0].spec.method == max(default.grid.expected_seconds, key=lambda kv: kv[1])[0]


def test_default_grid_dry_run_lists_every_method_and_the_budgets_that_fit(tmp_path: Path) -> None:
    # The default grid runs every method on one pair, MNIST lenet5-bn -> lenet5-half (spec §2.1), whatever
    # pair a method would prefer; the expected pair is written here, not read from the grid or the methods.
    result = CliRunner().invoke(main, ["run", "--grid", "--dry-run", "--json", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["name"] == "default"
    assert out["tracking_uri"] == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    fits = {CollectedUse.NONE: [0], CollectedUse.REQUIRED: [100, 1000], CollectedUse.OPTIONAL: [0, 100, 1000]}
    expected, skipped = [], []
    for name in method_names():
        cls = get_method(name)
        for collected in (0, 100, 1000):
            row = (name, "mnist", "lenet5-bn", "lenet5-half", collected, 0, "quick")
            (expected if collected in fits[cls.collected_use] else skipped).append(row)
    cells = [(c["method"], c["dataset"], c["teacher"], c["student"], c["budget"]["collected"], c["seed"], c["profile"])
             for c in out["cells"]]
    assert cells == expected
    assert {(c["teacher"], c["student"]) for c in out["cells"]} == {("lenet5-bn", "lenet5-half")}
    assert [(s["method"], s["collected"]) for s in out["skipped"]] == [(r[0], r[4]) for r in skipped]
    assert all(s["reason"] for s in out["skipped"])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "queue.db").exists()  # a dry run writes nothing
    text = CliRunner().invoke(main, ["run", "--grid", "--dry-run", "--results", str(tmp_path)]).output
    assert "skipped:" in text and "kd-real mnist lenet5-bn->lenet5-half c100 s0: method 'kd-real' trains on the labelled training set" in text
    assert "teacher mnist/lenet5-bn is not cached: it will be trained first" in text
    assert "teacher mnist/lenet5 is not cached" not in text  # one teacher to train


def test_quick_seeds_grid_is_the_default_grid_times_three_seeds() -> None:
    default, seeds = expand(load_grid("default")), expand(load_grid("mnist-quick-seeds"))
    def key(c):  # everything but the seed
        return (c.spec.method, c.spec.dataset, c.pair, c.spec.budget.collected, c.spec.profile, c.hparams)

    assert sorted({c.spec.seed for c in seeds.cells}) == [0, 1, 2]
    for seed in (0, 1, 2):
        assert [key(c) for c in seeds.cells if c.spec.seed == seed] == [key(c) for c in default.cells]


# ----------------------------------------------------------------------------- end to end
TINY = """\
name: e2e
iterations: 20
seeds: [0]
budgets: [0, 100]
datasets: [mnist]
methods:
  - toy-samples
  - {name: toy-nan, budgets: [0]}
  - {name: kd-collected, overrides: {objective: kd, eval_every: 10}}
"""


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_resume(tmp_path: Path, results: Path, data_root: Path, toy_methods,
                                         monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = expand(load_grid(write_grid(tmp_path, TINY)))
    assert [c.label for c in plan.cells] == [
        "toy-samples mnist lenet5->lenet5-half c0 s0", "toy-samples mnist lenet5->lenet5-half c100 s0",
        "toy-nan mnist lenet5->lenet5-half c0 s0", "kd-collected mnist lenet5->lenet5-half c100 s0",
    ]
    lines: list[str] = []
    outcome = run_grid(plan, settings_for(results, data_root), echo=lines.append)
    assert outcome.exit_code == 1  # toy-nan failed; the grid went on to kd-collected
    assert [r.status for r in outcome.rows] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert any("FAILED toy-nan" in line and "NonFiniteLossError" in line for line in lines), lines
    assert (results / "mlflow.db").is_file() and (results / "mlartifacts" / "e2e").is_dir()
    assert not (tmp_path / "mlruns").exists()

    client, exp, runs = cell_runs(results, "e2e")
    assert len(runs) == 4
    parents = tracking.search(client, exp, "tags.`dfkd.kind` = 'grid'")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    by_label = {r.info.run_name: r for r in runs}
    run = by_label["toy-samples mnist lenet5->lenet5-half c100 s0"]
    cell = plan.cells[1]
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert tags["dfkd.kind"] == "cell" and tags["dfkd.cell_id"] == cell.cell_id
    assert {k: tags[k] for k in ("method", "dataset", "budget", "seed", "pair", "profile")} == {
        "method": "toy-samples", "dataset": "mnist", "budget": "100", "seed": "0", "pair": "lenet5->lenet5-half",
        "profile": "quick"}
    assert {k: params[k] for k in ("hp.iterations", "hp.batch_size", "hp.eval_every", "hp.lr")} == {
        "hp.iterations": "20", "hp.batch_size": "32", "hp.eval_every": "10", "hp.lr": "0.05"}
    assert {k: params[k] for k in ("method", "dataset", "teacher", "student", "profile", "seed", "budget.collected",
                                   "budget.source", "budget.iterations", "budget.batch_size")} == {
        "method": "toy-samples", "dataset": "mnist", "teacher": "lenet5", "student": "lenet5-half", "profile": "quick",
        "seed": "0", "budget.collected": "100", "budget.source": "mnist:train", "budget.iterations": "20",
        "budget.batch_size": "32"}
    manifest = json.loads((results / "teachers" / "mnist" / "lenet5" / "manifest.json").read_text())
    assert params["teacher_id"] == f"mnist/lenet5@{manifest['sha256'][:12]}"
    assert float(params["teacher_test_accuracy"]) == manifest["test_accuracy"]
    assert params["code_version"].startswith("0.1.0")
    for key in ("test_accuracy", "best_val_test_accuracy", "best_val_accuracy", "teacher_accuracy", "teacher_images",
                "wall_seconds", "val_accuracy", "loss/kd"):
        assert key in metrics, key
    assert metrics["teacher_accuracy"] == pytest.approx(manifest["test_accuracy"])
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [10, 20]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [20]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "cell.yaml", "student.pt"} <= artifacts
    checkpoint = tracking.load_checkpoint(client, run.info.run_id)
    assert set(checkpoint) >= {"predictor", "best_predictor"} and "conv1.0.weight" in checkpoint["predictor"]
    kd_run = by_label["kd-collected mnist lenet5->lenet5-half c100 s0"]
    assert "samples.png" not in {a.path for a in client.list_artifacts(kd_run.info.run_id)}

    failed = by_label["toy-nan mnist lenet5->lenet5-half c0 s0"]
    assert failed.data.tags["dfkd.error_type"] == "NonFiniteLossError"
    error_text = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in error_text and "NonFiniteLossError" in error_text

    # Resume: finished cells are not run again, the failed one is.
    again = run_grid(plan, settings_for(results, data_root), echo=lines.append)
    assert again.exit_code == 1
    _, _, runs = cell_runs(results, "e2e")
    per_cell = collections.Counter((r.data.tags["dfkd.cell_id"], r.info.status) for r in runs)
    assert per_cell == {(plan.cells[0].cell_id, "FINISHED"): 1, (plan.cells[1].cell_id, "FINISHED"): 1,
                        (plan.cells[2].cell_id, "FAILED"): 2, (plan.cells[3].cell_id, "FINISHED"): 1}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


CRASH = """\
name: crash
seeds: [0]
budgets: [0, 100]
datasets: [mnist]
methods:
  - {name: kd-collected, iterations: 20, overrides: {objective: kd}}
  - toy-wait
"""


class Waiting(Method):
    """Touches ``<DFKD_TEST_EVENTS>/started`` once running, then blocks until the test creates ``release``.

    The crash test signals the process while this cell is provably running: no race between a training
    loop and the wall clock.
    """

    Hparams = ToyHparams
    collected_use = CollectedUse.NONE

    def run(self, ctx: DistillContext) -> None:
        events = Path(os.environ["DFKD_TEST_EVENTS"])
        ctx.watch(ctx.student)
        (events / "started").touch()
        while not (events / "release").exists():
            time.sleep(0.05)
        for i in range(1, ctx.iterations + 1):
            ctx.end_iteration(i)


WAITING_MAIN = """\
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import test_runner
from methods.core import registry
registry.register("toy-wait")(test_runner.Waiting)
from benchmark.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def waiting_method(tmp_path: Path, monkeypatch):
    events = tmp_path / "events"
    events.mkdir()
    monkeypatch.setenv("DFKD_TEST_EVENTS", str(events))
    registry.register("toy-wait")(Waiting)
    yield events
    registry._REGISTRY.pop("toy-wait", None)


class Command:
    """``dfkd-bench run`` (with the ``toy-wait`` method registered) in a subprocess, its output read in a thread."""

    def __init__(self, grid: Path, results: Path, data_root: Path) -> None:
        env = {**os.environ, "DFKD_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        script = grid.parent / "run_with_toy_wait.py"
        script.write_text(WAITING_MAIN.format(repo=str(REPO), tests=str(REPO / "tests")))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "run", "--grid", str(grid), "--results", str(results), "--device", "cpu",
             "--heartbeat", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_file(self, path: Path, timeout: float) -> None:
        """Until ``path`` exists (the event the toy method sets); fails early if the process ends first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.exists():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        raise AssertionError(f"{path.name} never appeared; output:\n{''.join(self.seen)[-3000:]}")

    def finish(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


def _running_toy_wait(results: Path):
    client = client_for(results)
    exp = tracking.find_experiment(client, "crash")
    runs = tracking.search(client, exp, "tags.method = 'toy-wait' and attributes.status = 'RUNNING'") if exp else []
    return runs[0] if runs else None


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume(tmp_path: Path, results: Path, data_root: Path, waiting_method: Path) -> None:
    grid = write_grid(tmp_path, CRASH)
    plan = expand(load_grid(grid))
    assert [c.spec.method for c in plan.cells] == ["kd-collected", "toy-wait"]
    started = waiting_method / "started"
    # SIGTERM while the toy-wait cell is blocked (it cannot finish before the test releases it): the running
    # cell is marked KILLED at once and the command exits 130.
    command = Command(grid, results, data_root)
    command.wait_for_file(started, 300)
    first = _wait_for(lambda: _running_toy_wait(results), 60, "the toy-wait run")
    command.proc.send_signal(signal.SIGTERM)
    assert command.finish(120) == 130
    client = client_for(results)
    assert client.get_run(first.info.run_id).info.status == "KILLED"
    # SIGKILL: nothing can clean up; the run is left RUNNING.
    started.unlink()
    command = Command(grid, results, data_root)
    command.wait_for_file(started, 300)
    second = _wait_for(lambda: _running_toy_wait(results), 60, "the toy-wait run to restart")
    command.proc.kill()
    command.finish(60)
    assert client.get_run(second.info.run_id).info.status == "RUNNING"
    # Resume (the cell released now): the stale run is marked KILLED (after the heartbeat grace), the cell
    # re-runs, and the kd-collected cell finished by the first process is neither lost nor duplicated.
    (waiting_method / "release").touch()
    outcome = run_grid(plan, settings_for(results, data_root), heartbeat=1, echo=lambda line: None)
    assert outcome.exit_code == 0, [(r.cell.label, r.status, r.error) for r in outcome.rows]
    assert client.get_run(second.info.run_id).info.status == "KILLED"
    _, exp, runs = cell_runs(results, "crash")
    per_cell = collections.Counter((r.data.tags["dfkd.cell_id"], r.info.status) for r in runs)
    assert per_cell == {(plan.cells[0].cell_id, "FINISHED"): 1, (plan.cells[1].cell_id, "KILLED"): 2,
                        (plan.cells[1].cell_id, "FINISHED"): 1}
    parents = tracking.search(client, exp, "tags.`dfkd.kind` = 'grid'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED", "KILLED"]


# ----------------------------------------------------------------------------- several workers
POP = """\
import sys, optuna
sys.path.insert(0, {repo!r})
from benchmark.workqueue import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="q", storage=open_storage(sys.argv[1], 5))
got = []
while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
    trial = study.ask()
    cell = trial.user_attrs.get("cell")
    if cell is None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        continue
    got.append(cell)
    study.tell(trial, 1.0)
print(" ".join(map(str, got)))
"""


def test_queue_never_hands_one_cell_to_two_workers(tmp_path: Path) -> None:
    """Three processes popping one SQLite queue: every cell exactly once (plain SQLite gives duplicates)."""
    import optuna

    url = f"sqlite:///{tmp_path / 'queue.db'}"
    study = optuna.create_study(study_name="q", storage=open_storage(url, 5))
    for i in range(90):
        study.enqueue_trial({}, user_attrs={"cell": i})
    script = tmp_path / "pop.py"
    script.write_text(POP.format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    got = collections.Counter(int(x) for out, _ in outputs for x in out.split())
    assert set(got) == set(range(90)) and max(got.values()) == 1


@pytest.mark.slow
def test_two_workers_split_the_grid(tmp_path: Path, results: Path, data_root: Path) -> None:
    grid = write_grid(tmp_path, """\
        name: pair
        iterations: 20
        seeds: [0, 1]
        budgets: [0, 100]
        datasets: [mnist]
        methods:
          - {name: kd-collected, overrides: {objective: kd}}
          - kd-real
        """)
    env = {**os.environ, "DFKD_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "benchmark", "run", "--grid", str(grid), "--results", str(results),
                           "--workers", "2", "--device", "cpu", "--json"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [c["status"] for c in out["cells"]] == ["FINISHED"] * 4
    plan = expand(load_grid(grid))
    _, _, runs = cell_runs(results, "pair")
    assert sorted(r.data.tags["dfkd.cell_id"] for r in runs) == sorted(c.cell_id for c in plan.cells)
    assert all(r.info.status == "FINISHED" for r in runs)


# ----------------------------------------------------------------------------- ui
def test_ui_binds_localhost_on_the_results_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ui", "--print-command", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"--backend-store-uri sqlite:///{(tmp_path / 'mlflow.db').resolve()}" in result.output
    assert "--host 127.0.0.1" in result.output and "--port 5000" in result.output
    assert f"--default-artifact-root {(tmp_path / 'mlartifacts').resolve().as_uri()}" in result.output
    exposed = CliRunner().invoke(main, ["ui", "--print-command", "--host", "0.0.0.0", "--results", str(tmp_path)])
    assert "--host 0.0.0.0" in exposed.output
    server = CliRunner().invoke(main, ["ui", "--tracking-uri", "http://mlflow.example:5000"])
    assert "open http://mlflow.example:5000" in server.output
