"""The evaluation-time probe of the teacher's last training batch (methods/core/probe.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from benchmark import zoo
from methods import Budget, CollectedUse, CommonHparams, Method, distill
from methods.core import registry
from methods.core.probe import PROBE_SAMPLES, REAL_PROBE_SAMPLES, class_coverage, score_batch, silent_units


def test_class_coverage_is_normalised_entropy_of_the_argmax_histogram():
    assert class_coverage(torch.tensor([3, 3, 3, 3]), 10).item() == pytest.approx(0.0, abs=1e-7)
    assert class_coverage(torch.arange(10).repeat(3), 10).item() == pytest.approx(1.0)
    # two classes, equally often, out of four: log 2 / log 4
    assert class_coverage(torch.tensor([0, 1, 0, 1]), 4).item() == pytest.approx(0.5)
    # 3:1 split of C = 2: the binary entropy of 1/4 in bits
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert class_coverage(torch.tensor([0, 0, 0, 1]), 2).item() == pytest.approx(h)


class Fixed(nn.Module):
    """Logits given per sample by a lookup on the first pixel (an integer index into ``table``)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.table[x[:, 0, 0, 0].long()]


def test_score_batch_against_its_formulas_and_modes_restored():
    table_t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -1.0]])
    table_s = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    x = torch.tensor([0.0, 1.0, 2.0, 1.0]).view(4, 1, 1, 1)
    teacher, student = Fixed(table_t).eval(), Fixed(table_s).train()
    out = score_batch(teacher, student, x, 3)
    z_t = table_t[[0, 1, 2, 1]]
    # teacher argmax: 0, 1, 0 (row 2 is [0, 0, -1]: a tie broken to index 0), 1
    assert out["probe/class_coverage"].item() == pytest.approx(math.log(2) / math.log(3))
    assert out["probe/teacher_confidence"].item() == pytest.approx(z_t.softmax(1).amax(1).mean().item())
    assert out["probe/teacher_logit_abs"].item() == pytest.approx(z_t.abs().mean().item())
    # student argmax: 0, 0, 2, 0 against 0, 1, 0, 1: one agreement in four
    assert out["probe/agreement"].item() == pytest.approx(0.25)
    assert teacher.modes == student.modes == [False]  # scored in eval mode
    assert student.training and not teacher.training  # and left as they were


def test_score_batch_looks_at_no_more_than_probe_samples():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.zeros(x.shape[0], 2)

    score_batch(Spy(), Spy(), torch.zeros(PROBE_SAMPLES + 40, 1, 2, 2), 2)
    assert seen == [PROBE_SAMPLES, PROBE_SAMPLES]


@dataclass
class OneClassHparams(CommonHparams):
    iterations: int = 4
    batch_size: int = 16
    eval_every: int = 2


class ShowsTheTeacher(Method):
    """Shows the teacher noise, then (last, in each iteration) a batch of identical blank images."""

    family = "test"
    citation = "none"
    Hparams = OneClassHparams
    collected_use = CollectedUse.NONE
    profiles = {"quick": {"*": {}}}
    last: dict = {}

    def run(self, ctx) -> None:
        ctx.watch(ctx.student)
        for it in range(1, ctx.iterations + 1):
            ctx.teacher(torch.randn(16, 1, 32, 32))
            blank = torch.full((16, 1, 32, 32), -0.4242) + 0.01 * it
            ctx.teacher(blank)
            ShowsTheTeacher.last[it] = blank
            ctx.end_iteration(it)


@pytest.fixture()
def shows_the_teacher():
    registry.register("probe-test")(ShowsTheTeacher)
    yield "probe-test"
    registry._REGISTRY.pop("probe-test")


def test_every_evaluation_scores_the_last_batch_the_teacher_saw(shows_the_teacher, mnist, lenet5_teacher):
    torch.manual_seed(0)
    student = zoo.build("lenet5-half", 10, 1)
    result = distill(lenet5_teacher, student, Budget(), method=shows_the_teacher, data=mnist, device="cpu")
    assert [e.iteration for e in result.history] == [2, 4]
    for evaluation in result.history:
        expected = score_batch(lenet5_teacher, student, ShowsTheTeacher.last[evaluation.iteration], 10)
        # identical images: one teacher class, coverage 0 (noise batches would spread over classes)
        assert evaluation.metrics["probe/class_coverage"] == pytest.approx(0.0, abs=1e-6)
        for key, value in expected.items():
            assert evaluation.metrics[key] == pytest.approx(value.item(), abs=1e-6)
    # the probe's forwards are not training: the teacher's image count is the method's alone
    assert result.teacher_images == 4 * 32


def test_silent_units_counts_the_stage_channels_and_penultimate_units_that_never_fire(mnist):
    # LeNet-5-half: 3 conv1 + 8 conv2 channels (post-ReLU stages) and 60 penultimate units = 71 units.
    torch.manual_seed(0)
    student = zoo.build("lenet5-half", 10, 1)
    x = mnist.val.normalized()[:64]
    with torch.no_grad():
        f = student.features(x)
        alive = sum(int((m > 0).any()) for stage in f.stages for m in stage.transpose(0, 1)) + int((f.vec > 0).any(0).sum())
    assert silent_units(student, x).item() == pytest.approx(1 - alive / 71)
    # silence 5 of the 8 conv2 channels (as CMI's bad runs at lr 0.01 did): a bias far below any input's reach
    conv2 = [m for m in student.modules() if isinstance(m, nn.Conv2d)][1]
    with torch.no_grad():
        conv2.bias[:5] = -1e4
        f = student.features(x)
    assert [int((f.stages[1][:, c] > 0).any()) for c in range(8)] == [0, 0, 0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        alive = sum(int((m > 0).any()) for stage in f.stages for m in stage.transpose(0, 1)) + int((f.vec > 0).any(0).sum())
    assert silent_units(student, x).item() == pytest.approx(1 - alive / 71)
    assert silent_units(student, x).item() >= 5 / 71
    assert student.training  # the mode is restored


def test_every_evaluation_reports_the_students_silent_units_on_held_out_digits(shows_the_teacher, mnist, lenet5_teacher):
    torch.manual_seed(0)
    student = zoo.build("lenet5-half", 10, 1)
    result = distill(lenet5_teacher, student, Budget(), method=shows_the_teacher, data=mnist, device="cpu")
    expected = silent_units(student, mnist.val.normalized()[:REAL_PROBE_SAMPLES]).item()  # nothing trains S here
    assert [e.metrics["probe/silent_units"] for e in result.history] == pytest.approx([expected, expected])
    assert result.teacher_images == 4 * 32
