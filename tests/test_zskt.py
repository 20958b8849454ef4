"""ZSKT (spec §4.5): KL/C and AT terms on hand-computed values, 1 G + 10 S steps per pseudo-batch on one z,
which parameters move in which step, gradient clipping, the cosine schedule, the CLI refusal, a short MNIST run."""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from benchmark import zoo
from methods import Budget, TaskData, distill, get_method
from methods.core.context import CountingTeacher
from methods.core.generators import GeneratorA
from methods.zskt import ZSKTHparams, belief_divergence, generator_loss, generator_step, student_loss, student_steps

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- loss terms
def test_kl_is_divided_by_the_number_of_classes() -> None:
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p_T = (3/4, 1/4), (1/2, 1/2)
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # p_S = (1/2, 1/2)
    kl = (0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 0.0) / 2  # batch mean
    assert belief_divergence(t, s).item() == pytest.approx(kl / 2, rel=1e-6)  # C = 2
    assert generator_loss(t, s).item() == pytest.approx(-kl / 2, rel=1e-6)
    # equals the released element-wise mean F.kl_div(log p_S, p_T) (reduction "mean")
    with warnings.catch_warnings():  # torch warns that "mean" is not "batchmean": that is the point
        warnings.simplefilter("ignore")
        released = nn.functional.kl_div(s.log_softmax(1), t.softmax(1), reduction="mean")
    assert belief_divergence(t, s).item() == pytest.approx(released.item(), rel=1e-6)


def test_student_loss_is_kl_over_c_plus_beta_times_the_at_pairs() -> None:
    t = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    # pair 1 (1×2 maps, one channel): a(F_S) = (1, 0), a(F_T) = (0, 1) → AT = mean((1, −1)²) = 1
    # pair 2 (1×4 maps, two channels): channel means of F² are (2, 0, 0, 0) and (1, 1, 1, 1) → a = (1, 0, 0, 0)
    #   and (1/2, 1/2, 1/2, 1/2) → AT = ((1/2)² + 3·(1/2)²) / 4 = 1/4
    f_s = [torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[2.0, 0.0, 0.0, 0.0]], [[2.0, 0.0, 0.0, 0.0]]]]).sqrt()]
    f_t = [torch.tensor([[[[0.0, 3.0]]]], requires_grad=True), torch.ones(1, 2, 1, 4)]
    terms = student_loss(t, s, f_t, f_s, beta=10.0)
    kl = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    at = 1.0 + 0.25
    assert terms["s_kl"].item() == pytest.approx(kl, rel=1e-6)
    assert terms["s_at"].item() == pytest.approx(at, rel=1e-6)
    assert terms["student"].item() == pytest.approx(kl + 10.0 * at, rel=1e-6)
    terms["student"].backward()
    assert t.grad is None and f_t[0].grad is None and s.grad is not None  # sg T, sg F_T


def test_lenet_pairs_are_conv1_and_conv2() -> None:
    from methods.core.attention import at_pairs

    x = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        t = zoo.build("lenet5-bn", 10, 1).eval().features(x).stages
        s = zoo.build("lenet5-half", 10, 1).features(x).stages
    assert [(a.shape[1:], b.shape[1:]) for a, b in at_pairs(s, t)] == [((3, 28, 28), (6, 28, 28)), ((8, 10, 10), (16, 10, 10))]


def test_zskt_generator_has_no_final_tanh() -> None:
    torch.manual_seed(0)
    inputs: list[torch.Tensor] = []
    for final_tanh in (True, False):
        generator = GeneratorA(100, 8, 1, final_tanh=final_tanh).train()
        with torch.no_grad():
            generator.conv3.weight.mul_(50.0)  # pre-activation far beyond ±1
        handle = generator.bn_out.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        generator(torch.randn(16, 100))
        handle.remove()
    assert inputs[0].abs().max() <= 1.0 and inputs[1].abs().max() > 1.0
    plain, fused = GeneratorA(100, 8, 1, final_tanh=False), GeneratorA(100, 8, 1, final_tanh=False, fused_upsample=True)
    fused.load_state_dict(plain.state_dict())
    z = torch.randn(8, 100)
    assert torch.allclose(plain.train()(z), fused.train()(z), atol=1e-4)


# ----------------------------------------------------------------------------- steps
class _Ctx:
    """The slice of DistillContext that the step functions use."""

    def __init__(self, teacher: CountingTeacher, student: nn.Module) -> None:
        self.teacher, self.student = teacher, student

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def toy(seed: int = 0) -> tuple[_Ctx, GeneratorA]:
    torch.manual_seed(seed)
    teacher = CountingTeacher(zoo.build("lenet5-bn", 10, 1))
    student = zoo.build("lenet5-half", 10, 1).train()
    return _Ctx(teacher, student), GeneratorA(100, 8, 1, final_tanh=False, fused_upsample=True).train()


def test_generator_step_moves_only_g_and_student_steps_move_only_s() -> None:
    ctx, generator = toy()
    teacher_state = copy.deepcopy(ctx.teacher.state_dict())
    s0, g0 = copy.deepcopy(ctx.student.state_dict()), copy.deepcopy(generator.state_dict())
    modes: list[bool] = []
    student = ctx.student  # features() bypasses forward(): watch S's first block
    handle = student.conv1.register_forward_pre_hook(lambda module, args: modes.append(student.training))
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    opt_s = torch.optim.Adam(ctx.student.parameters(), lr=2e-3)
    z = torch.randn(16, 100)

    generator_step(ctx, generator, opt_g, z, clip_norm=5.0)
    assert all(torch.equal(v, s0[k]) for k, v in ctx.student.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in ctx.student.parameters())  # frozen, then restored
    assert not torch.equal(generator.state_dict()["fc.weight"], g0["fc.weight"])
    g1 = {k: v.clone() for k, v in generator.named_parameters()}

    student_steps(ctx, generator, opt_s, z, ZSKTHparams(ngf=8))
    assert all(torch.equal(p, g1[k]) for k, p in generator.named_parameters())  # G unchanged in S steps
    assert not torch.equal(ctx.student.state_dict()["conv1.0.weight"], s0["conv1.0.weight"])
    assert all(torch.equal(v, teacher_state[k]) for k, v in ctx.teacher.state_dict().items())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert modes == [True] * 11  # S in train() in the G step and the 10 S steps (spec §1.6)
    assert ctx.teacher.images == 2 * 16  # G step, and one cached forward for the 10 S steps
    handle.remove()


def tiny_task(mnist: TaskData, n: int = 256) -> TaskData:
    idx = torch.arange(n)
    return TaskData(mnist.dataset, mnist.num_classes, mnist.channels, mnist.size, mnist.mean, mnist.std,
                    mnist.train_augment, mnist.val.subset(idx), mnist.test.subset(idx))


def test_one_pseudo_batch_is_one_g_step_then_ten_s_steps_on_one_z(mnist: TaskData) -> None:
    teacher, student = zoo.build("lenet5-bn", 10, 1), zoo.build("lenet5-half", 10, 1)
    student_params = {id(p) for p in student.parameters()}
    order: list[str] = []
    lrs: list[float] = []
    z_seen: list[torch.Tensor] = []
    x_seen: list[torch.Tensor] = []

    def count(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        is_s = id(optimizer.param_groups[0]["params"][0]) in student_params
        order.append("S" if is_s else "G")
        if is_s:
            lrs.append(optimizer.param_groups[0]["lr"])

    def on_forward(module: nn.Module, args: tuple) -> None:
        if isinstance(module, GeneratorA) and module.training:
            z_seen.append(args[0].clone())
        elif module is student.conv1 and module.training:  # S's training input (features() bypasses S's
            # forward; eval-mode calls are the harness's FLOP probe and validation)
            x_seen.append(args[0].clone())

    handles = [register_optimizer_step_post_hook(count), nn.modules.module.register_module_forward_pre_hook(on_forward)]
    try:
        result = distill(teacher, student, Budget(iterations=2), method="zskt", data=tiny_task(mnist),
                         overrides={"batch_size": 8, "ngf": 4, "samples": 2, "eval_every": 2})
    finally:
        for handle in handles:
            handle.remove()
    assert order == (["G"] + ["S"] * 10) * 2
    assert len(z_seen) == 4  # per pseudo-batch: the G step and the one no-grad forward for the S steps
    assert torch.equal(z_seen[0], z_seen[1]) and torch.equal(z_seen[2], z_seen[3])  # z fixed per pseudo-batch
    assert not torch.equal(z_seen[0], z_seen[2])  # and re-sampled for the next
    train_x = x_seen[:22]  # S forwards while training (validation follows)
    assert all(torch.equal(train_x[1], x) for x in train_x[2:11])  # the 10 S steps see one x
    assert result.teacher_images == 2 * 2 * 8
    assert lrs[:10] == [2e-3] * 10 and lrs[10] < 2e-3  # cosine over pseudo-batches, stepped per pseudo-batch
    assert {"loss/student", "loss/s_kl", "loss/s_at", "loss/generator"} <= set(result.history[-1].metrics)
    assert result.artifacts["samples"].dtype == torch.uint8


@pytest.mark.parametrize("clip_norm", [5.0, 0.0])
def test_every_step_clips_the_gradient_norm_to_5(mnist: TaskData, clip_norm: float) -> None:
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    teacher, student = zoo.build("lenet5-bn", 10, 1), zoo.build("lenet5-half", 10, 1)
    handle = register_optimizer_step_pre_hook(record)
    try:  # β 1e6 makes the raw gradient norms far above 5
        distill(teacher, student, Budget(iterations=1), method="zskt", data=tiny_task(mnist),
                overrides={"batch_size": 8, "ngf": 4, "samples": 2, "beta": 1e6, "clip_norm": clip_norm})
    finally:
        handle.remove()
    assert len(norms) == 11
    if clip_norm:
        assert max(norms) <= 5.0 * (1 + 1e-4)
    else:
        assert max(norms[1:]) > 5.0  # the same run unclipped: the bound above is the clip's doing


def test_profiles_follow_the_paper_recipe() -> None:
    cls = get_method("zskt")
    p = cls.resolve_hparams("paper", "mnist")
    assert (p.batch_size, p.iterations, p.student_steps, p.nz, p.ngf, p.beta) == (128, 80_000, 10, 100, 64, 250.0)
    assert (p.lr_s, p.lr_g, p.schedule, p.clip_norm) == (2e-3, 1e-3, "cosine", 5.0)
    assert all(cls.resolve_hparams("paper", d) == p for d in ("fashion-mnist", "cifar10", "cifar100"))
    q = cls.resolve_hparams("quick", "mnist")
    assert (q.beta, q.student_steps, q.lr_s, q.lr_g, q.schedule, q.clip_norm) == (250.0, 10, 2e-3, 1e-3, "cosine", 5.0)
    assert q.ngf < p.ngf and q.iterations < p.iterations
    assert set(cls.search_space) == {"beta", "lr_s", "lr_g"}
    assert cls.collected_use.value == "none"


# ----------------------------------------------------------------------------- CLI and a real run
def test_collected_budget_is_refused_with_one_line(results_dir, data_root) -> None:
    from click.testing import CliRunner

    from benchmark.cli import main

    out = CliRunner().invoke(main, ["distill", "--method", "zskt", "--dataset", "mnist", "--teacher", "lenet5-bn",
                                    "--student", "lenet5-half", "--collected", "10"],
                             env={"DFKD_RESULTS": str(results_dir), "DFKD_DATA": str(data_root)})
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is data-free and takes no collected examples" in lines[0]


def test_short_mnist_run_learns(lenet5_bn_teacher, data_free_run) -> None:
    # quick profile for 20 pseudo-batches (200 S steps, cosine over those 20): test 0.206 at seed 0 (2-epoch
    # teacher; 10 s CPU on a machine at load ~50), seed 1: 0.290, seed 2 not measured (the session ran out of
    # CPU); lengthen it (and raise the bound) once measured on an idle machine.
    result = data_free_run("zskt", lenet5_bn_teacher, iterations=20, eval_every=20)
    assert result.test_accuracy > 0.14, result.history[-1].metrics  # chance is 0.1
