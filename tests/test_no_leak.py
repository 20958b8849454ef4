"""No path to the test set (spec §1.4): refused pools, shuffled collected draws, a context without val/test."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from benchmark import zoo
from benchmark.cli import main
from benchmark.data import check_source
from benchmark.settings import make_settings
from methods import Budget, CollectedUse, CommonHparams, DfkdError, DistillContext, ImageSet, Method, distill
from methods.core import registry

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- collected sources
@pytest.mark.parametrize("source", ["mnist:test", "mnist:val", "mnist:validation", "cifar10:val"])
def test_refused_sources(source):
    with pytest.raises(DfkdError) as error:
        check_source("mnist", source)
    assert source in str(error.value) and "mnist:train" in str(error.value)


@pytest.mark.parametrize("source", [None, "mnist", "mnist:train", "fashion-mnist:train", "fashion-mnist:test"])
def test_allowed_sources(source):
    check_source("mnist", source)  # another dataset's test split is unseen data for this task


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("source", ["mnist:test", "mnist:val"])
@pytest.mark.parametrize("command", ["distill", "grid"])
def test_cli_refuses_the_tasks_own_test_or_val_split(results_dir, data_root, tmp_path, source, command):
    before = snapshot(results_dir)
    if command == "distill":
        args = ["distill", "--method", "kd-collected", "--dataset", "mnist", "--teacher", "lenet5",
                "--student", "lenet5-half", "--collected", "100", "--source", source]
    else:
        grid = tmp_path / "g.yaml"
        grid.write_text(f"name: leak\nbudgets: [{{collected: 100, source: '{source}'}}]\n"
                        "datasets: [mnist]\nmethods: [kd-collected]\n")
        args = ["run", "--grid", str(grid)]
    out = CliRunner().invoke(main, [*args, "--results", str(results_dir), "--data-dir", str(data_root),
                                    "--device", "cpu"])
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and source in lines[0] and "Traceback" not in out.output
    assert snapshot(results_dir) == before


# ----------------------------------------------------------------------------- the collected draw
def test_collected_subset_comes_in_a_seeded_random_order(mnist):
    first = mnist.collector.draw(100, 0, None, True)
    again = mnist.collector.draw(100, 0, None, True)
    other = mnist.collector.draw(100, 1, None, True)
    labels = first.labels.tolist()
    assert torch.equal(first.pixels, again.pixels)  # deterministic for a seed
    assert not torch.equal(first.pixels, other.pixels)
    assert sorted(torch.bincount(first.labels, minlength=10).tolist()) == [10] * 10  # still balanced
    changes = sum(a != b for a, b in zip(labels, labels[1:]))
    assert changes > 60  # grouped by class would give 9 changes; a random order ~90


# ----------------------------------------------------------------------------- the method's view
def reachable(obj, seen=None, depth=0):
    """Everything reachable from ``obj`` through attributes, dataclass fields and containers (not closures)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif isinstance(obj, nn.Module):
        children = []  # networks hold parameters, not data
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        yield from reachable(child, seen, depth + 1)


@dataclasses.dataclass
class SpyHparams(CommonHparams):
    iterations: int = 2
    eval_every: int = 1


class SpyMethod(Method):
    """A toy method that records everything it can reach through its context."""

    Hparams = SpyHparams
    collected_use = CollectedUse.OPTIONAL
    seen: list = []

    def run(self, ctx: DistillContext) -> None:
        ctx.watch(ctx.student)
        SpyMethod.seen = list(reachable(ctx))
        SpyMethod.seen += list(reachable(ctx.collected())) if ctx.collected_budget else []
        for it in range(1, ctx.iterations + 1):
            ctx.end_iteration(it)


def test_a_method_cannot_reach_val_or_test_data(mnist, lenet5_teacher, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "spy", SpyMethod)
    SpyMethod.name = "spy"
    distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(collected=50), method="spy", data=mnist,
            device="cpu")
    private = {mnist.val.pixels.data_ptr(), mnist.test.pixels.data_ptr(),
               mnist.val.labels.data_ptr(), mnist.test.labels.data_ptr()}
    images = [o for o in SpyMethod.seen if isinstance(o, ImageSet)]
    assert images, "the spy saw its collected examples"
    assert all(o.labels is None for o in images)  # no labelled set at all
    tensors = [o for o in SpyMethod.seen if isinstance(o, torch.Tensor)]
    assert not {t.data_ptr() for t in tensors} & private
    assert not any(isinstance(o, ImageSet) and len(o) in (len(mnist.val), len(mnist.test)) for o in SpyMethod.seen)


# ----------------------------------------------------------------------------- paths
def test_relative_paths_resolve_once_against_the_start_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DFKD_DATA", "../data-here")
    settings = make_settings("res", None, "cpu")
    os.chdir("/")
    assert settings.results == tmp_path / "res"
    assert settings.data_dir == tmp_path.parent / "data-here"
