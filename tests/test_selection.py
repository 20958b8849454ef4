"""Best-val selection, the test split's isolation, student.pt, and determinism (spec §1.5, §1.6).

A toy method sets its predictor's weights per iteration, so the validation curve is known in advance:
it improves at exactly one iteration and ties later with other weights.  The test split is an
``ImageSet`` that raises on any access while the method runs (and, in a search, at all).
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from benchmark import tracking, zoo
from benchmark.tune import TuneConfig, default_tune_storage, tune
from methods import Budget, CollectedUse, CommonHparams, DistillContext, Method, TaskData, distill
from methods.core import registry
from methods.core.images import ImageSet, accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- a test split that bites
class Gate:
    """Whether the test split may be read now (opened by the toy method as its ``run()`` returns)."""

    open = False


class GuardedImageSet(ImageSet):
    """An ``ImageSet`` that raises on any attribute access (data, length, device, ``to`` ...) while the gate is closed."""

    def __getattribute__(self, name: str):
        if not Gate.open and name not in ("__class__", "__repr__"):
            raise AssertionError(f"the test split was accessed ({name!r}) before the method's run() returned")
        return super().__getattribute__(name)

    def __len__(self) -> int:
        return ImageSet.__len__(self)

    def __repr__(self) -> str:
        return "GuardedImageSet(...)"


def guarded(images: ImageSet) -> GuardedImageSet:
    return GuardedImageSet(images.pixels, images.labels, images.size, images.mean, images.std)


def small_task(mnist: TaskData, n: int = 500, guard_test: bool = True) -> TaskData:
    idx = torch.arange(n)
    test = mnist.test.subset(idx)
    return dataclasses.replace(mnist, val=mnist.val.subset(idx), test=guarded(test) if guard_test else test)


# ----------------------------------------------------------------------------- a toy with a known curve
# Weight ``a`` of the predictor at each of 8 iterations (validated every iteration): a = 0 predicts one
# class (val ≈ 10%); a = 1 is the teacher (val ≈ 98%), first at iteration 3; a = 2 has the same argmax
# (a tie) at iteration 5; the run ends at a = 0 again.  So best_iteration is 3 and the best weights a = 1.
SCHEDULE = (0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0)
BEST_ITERATION = 3


class Mix(nn.Module):
    """logits = a·z_T(x) + (1 − min(a, 1))·[5, 0, ..., 0]: class 0 at a = 0, the teacher's argmax at a ≥ 1."""

    def __init__(self, teacher: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.a = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.register_buffer("bias", torch.nn.functional.one_hot(torch.tensor(0), num_classes).float() * 5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.teacher(x) + (1 - self.a.clamp(max=1)) * self.bias


@dataclass
class CurveHparams(CommonHparams):
    iterations: int = len(SCHEDULE)
    batch_size: int = 4
    eval_every: int = 1


class Curve(Method):
    Hparams = CurveHparams
    collected_use = CollectedUse.OPTIONAL
    seen: dict = {}

    def run(self, ctx: DistillContext) -> None:
        predictor = Mix(ctx.teacher.net, ctx.num_classes)
        ctx.watch(predictor)
        if ctx.collected_budget:
            Curve.seen["collected"] = ctx.collected().pixels.clone()
        for it, a in enumerate(SCHEDULE, start=1):
            with torch.no_grad():
                predictor.a.fill_(a)
            ctx.end_iteration(it, {"a": torch.tensor(a)})
        Gate.open = True  # run() returns now: from here on the harness may read the test split


@pytest.fixture
def curve():
    registry.register("toy-curve")(Curve)
    Gate.open = False
    yield "toy-curve"
    Gate.open = False
    registry._REGISTRY.pop("toy-curve", None)


def run_curve(method: str, teacher: nn.Module, data: TaskData, **kw):
    return distill(teacher, zoo.build("lenet5-half", 10, 1), Budget(**kw), method=method, data=data, seed=0)


def test_best_val_is_the_strict_first_maximum_and_its_test_accuracy_is_of_those_weights(
        curve, mnist, lenet5_teacher) -> None:
    data = small_task(mnist)
    result = run_curve(curve, lenet5_teacher, data)
    vals = [e.metrics["val_accuracy"] for e in result.history]
    assert [e.iteration for e in result.history] == list(range(1, 9))
    assert vals[2] == vals[4] > 0.9 > 0.2 > vals[0]  # the toy's curve as designed: a tie at 3 and 5
    assert result.best_iteration == BEST_ITERATION  # strict improvement keeps the earlier of the tie
    assert result.best_val_accuracy == vals[2]
    assert result.best_predictor.a.item() == 1.0  # the weights of iteration 3, not of the tie at 5
    assert result.predictor.a.item() == 0.0  # last weights
    Gate.open = True
    test = data.test.to("cpu")
    teacher_test = accuracy(lenet5_teacher, test)
    class0 = (test.labels == 0).float().mean().item()
    assert result.best_val_test_accuracy == teacher_test  # test accuracy of exactly the best-val weights
    assert result.test_accuracy == pytest.approx(class0)  # and of the last weights, which differ
    assert result.best_val_test_accuracy != result.test_accuracy


def test_student_pt_round_trips_with_weights_only_and_reproduces_best_val_test_accuracy(
        curve, mnist, lenet5_teacher, tmp_path: Path) -> None:
    data = small_task(mnist)
    result = run_curve(curve, lenet5_teacher, data)
    uri = tracking.default_tracking_uri(tmp_path)
    client = tracking.open_client(uri)
    exp = tracking.ensure_experiment(client, "roundtrip", tmp_path, uri)
    run_id = client.create_run(exp).info.run_id
    tracking.log_result(client, run_id, result)
    checkpoint = tracking.load_checkpoint(client, run_id)  # torch.load(..., weights_only=True)
    path = Path(client.download_artifacts(run_id, "student.pt", str(tmp_path)))
    assert torch.load(path, weights_only=True).keys() == checkpoint.keys()
    assert checkpoint["best_iteration"] == BEST_ITERATION
    rebuilt = copy.deepcopy(result.predictor)
    rebuilt.load_state_dict(checkpoint["best_predictor"])
    assert accuracy(rebuilt, data.test) == result.best_val_test_accuracy
    rebuilt.load_state_dict(checkpoint["predictor"])
    assert accuracy(rebuilt, data.test) == result.test_accuracy


def test_evaluate_test_false_never_touches_the_test_split(curve, mnist, lenet5_teacher, monkeypatch) -> None:
    monkeypatch.setattr(Curve, "run", lambda self, ctx: _run_without_opening(self, ctx))
    result = distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(), method=curve,
                     data=small_task(mnist), seed=0, evaluate_test=False)
    assert result.best_iteration == BEST_ITERATION
    assert result.test_accuracy != result.test_accuracy  # NaN: never computed


def _run_without_opening(self: Curve, ctx: DistillContext) -> None:
    predictor = Mix(ctx.teacher.net, ctx.num_classes)
    ctx.watch(predictor)
    for it, a in enumerate(SCHEDULE, start=1):
        with torch.no_grad():
            predictor.a.fill_(a)
        ctx.end_iteration(it)


def test_tune_never_touches_the_test_split(curve, mnist, results_dir: Path, data_root: Path, tmp_path: Path,
                                           monkeypatch) -> None:
    import benchmark.tune as tune_module

    monkeypatch.setattr(Curve, "run", lambda self, ctx: _run_without_opening(self, ctx))
    monkeypatch.setattr(Curve, "search_space", {"batch_size": CategoricalDistribution([4])})
    loaded: list[TaskData] = []

    def guarded_load(spec, settings, manifest, download=False):
        loaded.append(small_task(mnist))  # the gate stays closed for the whole search
        return loaded[-1]

    monkeypatch.setattr(tune_module, "load_data", guarded_load)
    results = tmp_path / "results"
    shutil.copytree(results_dir / "teachers", results / "teachers")
    config = TuneConfig(method=curve, dataset="mnist", teacher="lenet5", student="lenet5-half", collected=0,
                        profile="quick", iterations=None, seed=0, params=(), trials=1, study="guarded",
                        storage=default_tune_storage(results), tracking_uri=tracking.default_tracking_uri(results),
                        results=str(results), data_dir=str(data_root), device="cpu", pruner_startup=1)
    outcome = tune(config)
    trials = outcome.study.get_trials()
    assert loaded and [t.state.name for t in trials] == ["COMPLETE"], [t.user_attrs for t in trials]
    assert trials[0].value > 0.9  # best val of the toy's curve


# ----------------------------------------------------------------------------- determinism (CPU, one thread)
def tiny(mnist: TaskData) -> TaskData:
    return small_task(mnist, 200, guard_test=False)


def signature(result) -> tuple[list, dict[str, torch.Tensor]]:
    history = [(e.iteration, {k: v for k, v in e.metrics.items() if k != "wall_seconds"}) for e in result.history]
    return history, {k: v.clone() for k, v in result.student.state_dict().items()}


RUNS = {
    "dfad": (Budget(iterations=3), {"batch_size": 16, "ngf": 8, "student_steps": 2, "eval_every": 1, "samples": 4}),
    "kd-collected": (Budget(collected=40, iterations=6), {"batch_size": 16, "eval_every": 3}),
}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_same_seed_same_history_and_weights_other_seed_differs(method: str, mnist, lenet5_teacher) -> None:
    budget, overrides = RUNS[method]
    data = tiny(mnist)

    def run(seed: int):
        torch.manual_seed(1234 + seed)  # the harness, not the caller's RNG state, must fix what the run does
        torch.randn(7 * (seed + 1))
        student = zoo.build("lenet5-half", 10, 1)
        student.load_state_dict(initial)
        return signature(distill(lenet5_teacher, student, budget, method=method, data=data, overrides=overrides,
                                 seed=seed, device="cpu"))

    torch.manual_seed(0)
    initial = zoo.build("lenet5-half", 10, 1).state_dict()
    (h0, w0), (h0b, w0b), (h1, w1) = run(0), run(0), run(1)
    assert h0 == h0b
    assert w0.keys() == w0b.keys() and all(torch.equal(w0[k], w0b[k]) for k in w0)
    assert h0 != h1
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_collected_draw_follows_the_run_seed(curve, mnist, lenet5_teacher) -> None:
    data = small_task(mnist, guard_test=False)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(99 + len(draws))  # unrelated RNG state before the run must not matter
        distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(collected=30), method=curve, data=data,
                seed=seed)
        draws.append(Curve.seen.pop("collected"))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
