"""The harness's memory layout (methods/core/layout.py): channels-last on CPU, same function, every network moved."""
from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

from benchmark import zoo
from benchmark.cli import main
from methods import Budget, distill
from methods.core.accounting import Accountant
from methods.core.errors import DfkdError
from methods.core.generators import GeneratorA
from methods.core.layout import ENV, memory_format

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_channels_last(module: torch.nn.Module) -> bool:
    """Every 4-d weight with more than one input channel (a 1-channel one is both layouts at once) is channels-last."""
    weights = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert weights
    return all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)


def test_default_and_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert memory_format(torch.device("cpu")) == torch.channels_last
    assert memory_format(torch.device("cuda")) == torch.contiguous_format  # not measured there: PyTorch's default
    monkeypatch.setenv(ENV, "contiguous")
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
    monkeypatch.setenv(ENV, "nhwc")
    with pytest.raises(DfkdError, match=r"bad DFKD_MEMORY_FORMAT='nhwc'; allowed: channels_last, contiguous"):
        memory_format(torch.device("cpu"))


def test_same_function_and_input_gradient(lenet5_bn_teacher, mnist, monkeypatch):
    """Teacher logits and the gradient to the input (what a generator step uses) agree across layouts.

    Reference: the same teacher in float64.  Max-pool and ReLU kinks make a few input gradients of
    any float32 computation jump (measured: ~1.5% relative error in either layout), so the gradient
    is compared by its relative error norm, the logits element-wise.
    """
    monkeypatch.delenv(ENV, raising=False)
    net = zoo.build("lenet5-bn", 10, 1)
    net.load_state_dict(lenet5_bn_teacher.state_dict())
    net.eval().requires_grad_(False)
    x = mnist.val.batch(slice(0, 64))

    def logits_and_grad(model, dtype=torch.float32):
        xi = x.clone().to(dtype).requires_grad_()
        logits = model(xi)
        logits.square().sum().backward()
        return logits.detach().float(), xi.grad.float()

    ref_logits, ref_grad = logits_and_grad(copy.deepcopy(net).double(), torch.float64)
    for layout in ("contiguous", "channels_last"):
        monkeypatch.setenv(ENV, layout)
        net.to(memory_format=memory_format(torch.device("cpu")))
        logits, grad = logits_and_grad(net)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert (grad - ref_grad).norm() / ref_grad.norm() < 0.05, layout
    assert _is_channels_last(net)
    assert ref_logits.abs().mean() > 1  # a real teacher on real digits, not a degenerate comparison


def test_parameters_keep_their_identity():
    """Optimizers built before the move still update the module's parameters."""
    g = GeneratorA(nz=8, ngf=4, nc=1)
    before = [id(p) for p in g.parameters()]
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    g.to(memory_format=memory_format(torch.device("cpu")))
    assert [id(p) for p in g.parameters()] == before
    g(torch.randn(4, 8)).sum().backward()
    w = g.conv2.weight.detach().clone()
    opt.step()
    assert not torch.equal(w, g.conv2.weight)


@pytest.mark.parametrize("layout, expected", [(None, True), ("contiguous", False)])
def test_distill_moves_teacher_student_and_tracked_networks(lenet5_bn_teacher, mnist, monkeypatch, layout, expected):
    if layout is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, layout)
    teacher = zoo.build("lenet5-bn", 10, 1)
    teacher.load_state_dict(lenet5_bn_teacher.state_dict())
    student = zoo.build("lenet5-half", 10, 1)
    tracked: dict[str, bool] = {}
    original = Accountant.track

    def spy(self, role, module, *example):  # sees each network as the harness hands it to accounting
        tracked[role] = _is_channels_last(module)
        return original(self, role, module, *example)

    monkeypatch.setattr(Accountant, "track", spy)
    result = distill(teacher, student, Budget(iterations=2, batch_size=16), method="dfad", data=mnist,
                     overrides={"eval_every": 1, "ngf": 4}, seed=0, device="cpu", evaluate_test=False)
    assert tracked == {"teacher": expected, "student": expected, "generator": expected}
    assert _is_channels_last(student) == expected
    assert 0 <= result.best_val_accuracy <= 1  # the run completed


def test_bad_layout_from_the_cli_is_one_line_exit_2(results_dir, data_root):
    out = CliRunner().invoke(main, ["distill", "--method", "dfad", "--dataset", "mnist", "--teacher", "lenet5",
                                    "--student", "lenet5-half", "--iterations", "1", "--device", "cpu",
                                    "--results", str(results_dir)],
                             env={"DFKD_DATA": str(data_root), ENV: "fast"})
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert lines == ["Error: bad DFKD_MEMORY_FORMAT='fast'; allowed: channels_last, contiguous"], out.output
