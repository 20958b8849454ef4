"""Shared fixtures: real MNIST from DFKD_DATA (never downloaded) and small cached teachers."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from benchmark import zoo
from benchmark.data import load_task
from benchmark.teachers import default_recipe, load_teacher, timed_train
from methods import Budget, DistillResult, TaskData, distill
from methods.core.context import BaseCallback

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A relative DFKD_DATA (README: DFKD_DATA=../shared/data) means: relative to where pytest was started.
# Resolve it once, now, and export the absolute path, so that no test (nor a subprocess it starts
# in another directory) depends on the current directory.
if os.environ.get("DFKD_DATA"):
    os.environ["DFKD_DATA"] = os.path.abspath(os.environ["DFKD_DATA"])


def _data_root() -> Path:
    root = Path(os.environ.get("DFKD_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found under {root}; set DFKD_DATA to the folder holding MNIST/raw")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny runs (use with ``pytestmark = usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _data_root()


@pytest.fixture(scope="session")
def mnist(data_root: Path) -> TaskData:
    """MNIST train-core / val / test as tensors on the CPU."""
    return load_task("mnist", data_root)


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory: pytest.TempPathFactory, mnist: TaskData) -> Path:
    """A results folder holding a LeNet-5 and a LeNet-5-BN MNIST teacher (2 epochs: ≈ 98%)."""
    root = tmp_path_factory.mktemp("results")
    recipe = dataclasses.replace(default_recipe("mnist"), epochs=2)
    for arch in ("lenet5", "lenet5-bn"):
        timed_train(root, "mnist", arch, mnist, recipe, seed=0, device=torch.device("cpu"))
    return root


@pytest.fixture(scope="session")
def lenet5_teacher(results_dir: Path) -> torch.nn.Module:
    return load_teacher(results_dir, "mnist", "lenet5")[0]


@pytest.fixture(scope="session")
def lenet5_bn_teacher(results_dir: Path) -> torch.nn.Module:
    return load_teacher(results_dir, "mnist", "lenet5-bn")[0]


class MetricSpy(BaseCallback):
    """Keeps the last value of every metric a method logs (e.g. ``generator/label_agreement``)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)


@pytest.fixture
def metric_spy() -> MetricSpy:
    return MetricSpy()


@pytest.fixture(scope="session")
def data_free_run(mnist: TaskData):
    """``run(method, teacher, callbacks=(), **overrides)``: a data-free quick-profile MNIST run into a fresh
    LeNet-5-half, seed 0, on the CPU."""

    def run(method: str, teacher: torch.nn.Module, callbacks=(), **overrides) -> DistillResult:
        torch.manual_seed(0)
        student = zoo.build("lenet5-half", 10, 1)
        return distill(teacher, student, Budget(), method=method, data=mnist, profile="quick",
                       overrides=overrides, seed=0, device="cpu", callbacks=callbacks)

    return run
