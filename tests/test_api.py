"""The distill API: budget enforcement, labels withheld, counting, overrides, evaluation protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

from benchmark import zoo
from methods import Budget, BudgetError, CollectedUse, CommonHparams, DfkdError, Method, distill, get_method
from methods.core import registry
from methods.core.method import coerce_overrides


@dataclass
class ToyHparams(CommonHparams):
    iterations: int = 6
    batch_size: int = 8
    eval_every: int = 2
    lr: float = 0.1
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    milestones: tuple[float, ...] = (0.5,)
    ask_for: int = 0


class Toy(Method):
    """Looks at what the context gives it and records it."""

    family = "test"
    citation = "none"
    Hparams = ToyHparams
    collected_use = CollectedUse.OPTIONAL
    profiles = {"quick": {"*": {}}, "paper": {"mnist": {"iterations": 4}}}
    seen: dict = {}

    def run(self, ctx) -> None:
        hp = self.hp
        ctx.watch(ctx.student)
        if ctx.collected_budget:
            images = ctx.collected(hp.ask_for or None)
            Toy.seen["labels"] = images.labels
            Toy.seen["n"] = len(images)
        Toy.seen["teacher_grad"] = any(p.requires_grad for p in ctx.teacher.parameters())
        Toy.seen["teacher_training"] = ctx.teacher.training
        for it in range(1, ctx.iterations + 1):
            x = torch.randn(hp.batch_size, 1, 32, 32)
            ctx.teacher(x)
            ctx.end_iteration(it, {"zero": torch.zeros(())})


@pytest.fixture()
def toy():
    registry.register("toy-test")(Toy)
    yield "toy-test"
    registry._REGISTRY.pop("toy-test")


def _student():
    torch.manual_seed(0)
    return zoo.build("lenet5-half", 10, 1)


def test_budget_rejects_bad_values():
    with pytest.raises(BudgetError, match="bad collected budget -1"):
        Budget(collected=-1)
    with pytest.raises(BudgetError, match="bad iterations 0"):
        Budget(iterations=0)


def test_collected_examples_come_without_labels_and_budget_is_enforced(toy, mnist, lenet5_teacher):
    result = distill(lenet5_teacher, _student(), Budget(collected=30), method=toy, data=mnist)
    assert Toy.seen["labels"] is None and Toy.seen["n"] == 30
    with pytest.raises(BudgetError, match="asked for 31 collected examples; the budget allows 30"):
        distill(lenet5_teacher, _student(), Budget(collected=30), method=toy, data=mnist, overrides={"ask_for": 31})
    with pytest.raises(BudgetError, match="exceeds the 54000 examples"):
        distill(lenet5_teacher, _student(), Budget(collected=54_001), method=toy, data=mnist)
    assert result.budget.collected == 30


def test_policy_none_and_required(mnist, lenet5_teacher):
    with pytest.raises(BudgetError, match="'kd-real' trains on the labelled training set.*collected=5, allowed: 0"):
        distill(lenet5_teacher, _student(), Budget(collected=5), method="kd-real", data=mnist)
    with pytest.raises(BudgetError, match="'dfad' is data-free and takes no collected examples; got collected=5"):
        distill(lenet5_teacher, _student(), Budget(collected=5), method="dfad", data=mnist)
    with pytest.raises(BudgetError, match="needs collected examples"):
        distill(lenet5_teacher, _student(), Budget(), method="kd-collected", data=mnist)


def test_teacher_frozen_counted_and_evaluation_protocol(toy, mnist, lenet5_teacher):
    result = distill(lenet5_teacher, _student(), Budget(), method=toy, data=mnist)
    assert Toy.seen["teacher_grad"] is False and Toy.seen["teacher_training"] is False
    assert result.teacher_images == 6 * 8
    assert [e.iteration for e in result.history] == [2, 4, 6]
    assert result.best_val_accuracy == max(e.metrics["val_accuracy"] for e in result.history)
    assert result.history[0].metrics["loss/zero"] == 0.0
    assert 0.0 <= result.test_accuracy <= 1.0 and result.teacher_accuracy > 0.9


def test_profiles_overrides_and_budget_compute(toy, mnist, lenet5_teacher):
    cls = get_method(toy)
    assert cls.resolve_hparams("paper", "mnist").iterations == 4
    with pytest.raises(DfkdError, match="profile 'paper' of method 'toy-test' has no recipe for dataset 'cifar10'"):
        cls.resolve_hparams("paper", "cifar10")
    result = distill(lenet5_teacher, _student(), Budget(iterations=3, batch_size=2), method=toy, data=mnist)
    assert result.hparams["iterations"] == 3 and result.teacher_images == 6


def test_override_coercion_and_errors():
    out = coerce_overrides(ToyHparams, {"lr": "0.5", "mode": "b", "flag": "true", "milestones": "0.3,0.6", "iterations": "1e3"})
    assert out == {"lr": 0.5, "mode": "b", "flag": True, "milestones": (0.3, 0.6), "iterations": 1000}
    with pytest.raises(DfkdError, match="unknown hyperparameter 'lrr'.*allowed: .*lr"):
        coerce_overrides(ToyHparams, {"lrr": "1"}, "toy")
    with pytest.raises(DfkdError, match="bad value 'x' for 'lr'; expected a number"):
        coerce_overrides(ToyHparams, {"lr": "x"})
    with pytest.raises(DfkdError, match="bad value 'c' for 'mode'; allowed: a, b"):
        coerce_overrides(ToyHparams, {"mode": "c"})
    with pytest.raises(DfkdError, match="expected an integer"):
        coerce_overrides(ToyHparams, {"iterations": "2.5"})
    with pytest.raises(DfkdError, match="expected a boolean"):
        coerce_overrides(ToyHparams, {"flag": "maybe"})


def test_unknown_method_lists_allowed():
    with pytest.raises(DfkdError, match="unknown method 'nope'; allowed: .*kd-collected.*kd-real"):
        get_method("nope")


def test_non_finite_loss_is_reported(toy, mnist, lenet5_teacher, monkeypatch):
    from methods import NonFiniteLossError

    def bad_run(self, ctx):
        ctx.watch(ctx.student)
        for it in range(1, ctx.iterations + 1):
            ctx.end_iteration(it, {"bad": torch.tensor(float("nan"))})

    monkeypatch.setattr(Toy, "run", bad_run)
    with pytest.raises(NonFiniteLossError, match="loss 'bad' is nan at iteration 2"):
        distill(lenet5_teacher, _student(), Budget(), method=toy, data=mnist)


def test_student_is_a_module(mnist, lenet5_teacher, toy):
    result = distill(lenet5_teacher, _student(), Budget(), method=toy, data=mnist)
    assert isinstance(result.student, nn.Module) and isinstance(result.best_predictor, nn.Module)


def test_loss_meter_means_per_name_and_rejects_non_finite():
    from methods import NonFiniteLossError
    from methods.core.meters import LossMeter

    meter = LossMeter()
    for value in (1.0, 2.0, 6.0):
        meter.add("a", torch.tensor(value))
    meter.add("b", torch.tensor(4.0))
    assert meter.means("at iteration 3", {"w": torch.tensor(0.5)}) == {"a": 3.0, "b": 4.0, "w": 0.5}
    assert not meter  # reset after reporting
    meter.add("c", torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="GAN value 'c' is inf at GAN iteration 7"):
        meter.means("at GAN iteration 7", what="GAN value")
