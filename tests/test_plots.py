"""Tables and figures from synthetic MLflow runs logged in the runner's schema (no training)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.entities import Metric, Param, RunTag
from PIL import Image

from benchmark import tracking
from benchmark.cli import main
from benchmark.grid import load_grid, packaged_grids
from methods import method_names

PAIR = "lenet5->lenet5-half"


def log_cell(client, exp: str, method: str, seed: int, budget: int, test: float, hp: dict, val: list[float],
             teacher: float = 0.99, kind: str = "cell", status: str = "FINISHED", samples: bool = False) -> str:
    tags = {"dfkd.kind": kind, "method": method, "dataset": "mnist", "budget": str(budget), "seed": str(seed),
            "pair": PAIR, "profile": "quick"}
    run_id = client.create_run(exp, tags=tags).info.run_id
    params = {f"hp.{k}": str(v) for k, v in hp.items()} | {"budget.collected": str(budget), "seed": str(seed)}
    metrics = [Metric("val_accuracy", v, 0, 10 * (i + 1)) for i, v in enumerate(val)]
    final = {"best_val_accuracy": max(val), "teacher_accuracy": teacher}
    if kind == "cell":
        final |= {"test_accuracy": test, "best_val_test_accuracy": test}
    metrics += [Metric(k, v, 0, 10 * len(val)) for k, v in final.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag("x", "y")])
    if samples:
        pixels = (np.arange(28 * 28 * 4) % 255).astype(np.uint8).reshape(56, 56)
        client.log_image(run_id, Image.fromarray(pixels), artifact_file="samples.png")
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple, list[float]]]:
    """Two experiments: a method comparison and a one-at-a-time sweep (lambda_d, lambda_g, collected)."""
    results = tmp_path_factory.mktemp("plots") / "results"
    uri = tracking.default_tracking_uri(results)
    client = tracking.open_client(uri)
    exp = tracking.ensure_experiment(client, "compare", results, uri)
    values: dict[tuple, list[float]] = {}
    rng = np.random.default_rng(0)
    for method, base in (("kd-collected", 0.8), ("kd-real", 0.95)):
        for budget in (100, 500):
            for seed in range(3):
                test = float(base + 0.01 * seed + (0.02 if budget == 500 else 0) + rng.normal(0, 1e-3))
                values.setdefault((method, budget), []).append(test)
                log_cell(client, exp, method, seed, budget, test, {"lr": 0.05}, [0.3, 0.6, test],
                         samples=(method == "kd-collected" and seed == 0))
    log_cell(client, exp, "kd-real", 9, 100, 0.0, {"lr": 0.05}, [0.1], status="FAILED")  # never counted
    sweep = tracking.ensure_experiment(client, "sweep", results, uri)
    base_hp = {"lambda_d": 1.0, "lambda_g": 0.1, "inflation": 2}
    variants = [dict(base_hp)] + [{**base_hp, "lambda_d": v} for v in (0.1, 10.0)] + \
        [{**base_hp, "lambda_g": v} for v in (0.01, 1.0)]
    for hp in variants:
        for budget in ((100, 1000) if hp == base_hp else (100,)):
            for seed in range(2):
                acc = 0.9 - 0.01 * abs(np.log10(hp["lambda_d"])) + 0.001 * seed + (0.05 if budget == 1000 else 0)
                log_cell(client, sweep, "hidfd-like", seed, budget, float(acc), hp, [0.5, float(acc)])
    return results, values


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def test_table_cells_are_the_means_of_the_logged_metrics(store) -> None:
    results, values = store
    out = invoke("table", "--experiment", "compare", "--format", "csv", "--results", str(results))
    assert out.exit_code == 0, out.output
    frame = pd.read_csv(results / "tables" / "compare.csv")
    for (method, budget), tests in values.items():
        row = frame[(frame.method == method) & (frame.budget == budget)].iloc[0]
        assert row["mean"] == pytest.approx(100 * np.mean(tests), abs=1e-3)
        assert row["std"] == pytest.approx(100 * np.std(tests, ddof=1), abs=1e-3)
        assert row["n"] == 3  # the FAILED run is not counted
    teacher = frame[frame.method == "teacher"]
    assert set(teacher.budget) == {100, 500} and teacher["mean"].tolist() == pytest.approx([99.0, 99.0])

    md = invoke("table", "--experiment", "compare", "--results", str(results))
    assert md.exit_code == 0
    lines = (results / "tables" / "compare.md").read_text().splitlines()
    assert lines[0] == "| method | mnist c=100 | mnist c=500 |"
    assert lines[2].startswith("| teacher | 99.00 ± 0.00 (6)")  # every run of the column
    kd = next(line for line in lines if line.startswith("| kd-collected"))
    assert f"{100 * np.mean(values[('kd-collected', 100)]):.2f} ± " in kd and "(3)" in kd
    latex = invoke("table", "--experiment", "compare", "--format", "latex", "--results", str(results))
    assert latex.exit_code == 0 and r"\begin{tabular}{lcc}" in latex.output and r"$\pm$" in latex.output


def test_sensitivity_panel_and_figure2(store) -> None:
    results, _ = store
    out = invoke("plot", "sensitivity", "--param", "lambda_d", "--experiment", "sweep", "--results", str(results))
    assert out.exit_code == 0, out.output
    png = results / "plots" / "sensitivity-sweep-lambda_d.png"
    assert png.is_file() and (results / "plots" / "sensitivity-sweep-lambda_d.pdf").is_file()
    assert Image.open(png).size[0] > 400
    from benchmark.report import plot_sensitivity

    _, points = plot_sensitivity(tracking.default_tracking_uri(results), results, "sweep", "lambda_d")
    # one-at-a-time slice: lambda_g at its base, collected at its base (100): 3 lambda_d values x 2 seeds
    assert sorted(points["x"]) == [0.1, 1.0, 10.0] and set(points["n"]) == {2}
    at_one = points[points.x == 1.0].iloc[0]
    assert at_one["mean"] == pytest.approx(100 * (0.900 + 0.901) / 2, abs=1e-6)  # seeds 0 and 1 at lambda_d = 1
    _, collected = plot_sensitivity(tracking.default_tracking_uri(results), results, "sweep", "collected")
    assert sorted(collected["x"]) == [100.0, 1000.0]
    assert collected.set_index("x").loc[1000.0, "mean"] == pytest.approx(95.05, abs=1e-6)
    _, all_points = plot_sensitivity(tracking.default_tracking_uri(results), results, "sweep", "all")
    assert set(all_points["param"]) == {"lambda_d", "lambda_g", "collected"}
    assert (results / "plots" / "sensitivity-sweep-all.pdf").is_file()
    client = tracking.open_client(tracking.default_tracking_uri(results))
    plots = tracking.search(client, tracking.find_experiment(client, "sweep"), "tags.`dfkd.kind` = 'plot'")
    assert plots and {a.path for a in client.list_artifacts(plots[0].info.run_id, "plots")}


def test_curves_and_samples(store) -> None:
    results, _ = store
    out = invoke("plot", "curves", "--experiment", "compare", "--results", str(results))
    assert out.exit_code == 0, out.output
    assert (results / "plots" / "curves-compare-mnist-lenet5--lenet5-half-c100.png").is_file()
    out = invoke("plot", "samples", "--experiment", "compare", "--method", "kd-collected", "--results", str(results))
    assert out.exit_code == 0, out.output
    assert any(p.name.startswith("samples-kd-collected-") and p.suffix == ".pdf" for p in (results / "plots").iterdir())


@pytest.mark.parametrize("args, message", [
    (["plot", "sensitivity", "--param", "lambda_x", "--experiment", "sweep"],
     "unknown parameter 'lambda_x': no run records it; allowed: collected, inflation, lambda_d, lambda_g"),
    (["plot", "sensitivity", "--param", "lambda_d", "--experiment", "nope"], "no MLflow experiment 'nope'"),
    (["table", "--experiment", "empty"], "no finished run in experiment 'empty'"),
    (["table", "--experiment", "compare", "--metric", "acc"], "no run has metric 'acc'"),
    (["plot", "samples", "--experiment", "sweep"], "no finished run has samples.png"),
])
def test_errors_are_one_line(store, args: list[str], message: str) -> None:
    results, _ = store
    client = tracking.open_client(tracking.default_tracking_uri(results))
    tracking.ensure_experiment(client, "empty", results, tracking.default_tracking_uri(results))
    out = invoke(*args, "--results", str(results))
    assert out.exit_code == 2, out.output
    assert message in out.output and len(out.output.strip().splitlines()) == 1


def test_sensitivity_grid_sweeps_figure2_parameters() -> None:
    path = packaged_grids()["hidfd-sensitivity"]
    data = yaml.safe_load(io.StringIO(path.read_text()))
    entry = data["methods"][0]
    assert entry["name"] == "hidfd" and set(entry["sweep"]) == {"lambda_d", "lambda_g", "inflation", "collected"}
    assert len(entry["sweep"]["collected"]) >= 3 and len(data["seeds"]) >= 2
    assert "hidfd" in method_names()  # a registry regression fails here, it is not skipped
    from benchmark.grid import expand

    plan = expand(load_grid("hidfd-sensitivity"))
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)


def test_grid_sweep_varies_one_value_at_a_time() -> None:
    from benchmark.grid import GridError, expand, parse_grid

    grid = parse_grid({"name": "s", "seeds": [0, 1], "budgets": [100], "datasets": ["mnist"], "methods": [
        {"name": "kd-collected", "overrides": {"lr": 0.05}, "sweep": {"lr": [0.01, 0.2], "collected": [500]}}]})
    cells = expand(grid).cells
    settings = sorted({(c.hparams["lr"], c.spec.budget.collected) for c in cells})
    assert settings == [(0.01, 100), (0.05, 100), (0.05, 500), (0.2, 100)]  # base + each value alone
    assert len(cells) == 8 and len({c.cell_id for c in cells}) == 8
    with pytest.raises(GridError, match=r"methods\[0\].sweep: unknown hyperparameter 'lambda' for method"):
        parse_grid({"name": "s", "datasets": ["mnist"], "methods": [{"name": "kd-collected", "sweep": {"lambda": [1]}}]})
