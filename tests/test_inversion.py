"""DeepInversion / ADI (spec §4.4) and CMI (§4.6): priors and losses on tiny tensors, the pool and bank,
the lowest-loss iterate, gradient flow during synthesis, the BN-teacher requirement, short MNIST runs."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from benchmark import zoo
from benchmark.cli import main
from methods import Budget, TaskData, distill, get_method, method_names
from methods.adi import ADI, ADIHparams, Pixels
from methods.cmi import CMI, CMIHparams, contrastive_loss, info_nce
from methods.core.context import CountingTeacher, DistillContext
from methods.core.hooks import BNInputMeans, BNStatisticsLoss
from methods.core.inversion import LowestLoss, PixelPool, RingBuffer, js_divergence, total_variation
from methods.deepinv import DeepInversion

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- priors and divergences
def test_total_variation_is_the_sum_of_four_frobenius_norms() -> None:
    x = torch.tensor([[1.0, 2.0], [4.0, 8.0]]).view(1, 1, 2, 2)
    # horizontal (1−2, 4−8), vertical (1−4, 2−8), diagonal (4−2), anti-diagonal (1−8)
    expected = math.sqrt(1 + 16) + math.sqrt(9 + 36) + 2 + 7
    assert total_variation(x).item() == pytest.approx(expected)
    assert total_variation(torch.full((2, 3, 4, 4), 0.3)).item() == 0.0


def test_js_divergence_matches_the_formula() -> None:
    # at τ = 3: teacher logits (0, 0) → p = (1/2, 1/2); student (3 ln 3, 0) → q = (3/4, 1/4)
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[3 * math.log(3.0), 0.0]])
    p, q = (0.5, 0.5), (0.75, 0.25)
    m = tuple((a + b) / 2 for a, b in zip(p, q, strict=True))
    kl = lambda a, b: sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True))  # noqa: E731
    assert js_divergence(t, s, 3.0).item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-5)
    assert js_divergence(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # batch mean: a second, identical pair leaves the value unchanged
    assert js_divergence(t.repeat(2, 1), s.repeat(2, 1), 3.0).item() == pytest.approx(js_divergence(t, s, 3.0).item())


def test_bn_loss_is_zero_when_batch_statistics_equal_the_running_ones() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    net = nn.Sequential(bn)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))  # r_l uses the biased variance (spec §2.5)
    loss = BNStatisticsLoss(net)
    with loss.capture():
        net(x)
    assert loss.loss().item() == pytest.approx(0.0, abs=1e-5)
    with loss.capture():
        net(x + 1.0)  # means off by 1 in each of 3 channels, variances equal: r = ‖(1, 1, 1)‖ = √3
    assert loss.loss().item() == pytest.approx(math.sqrt(3.0), rel=1e-5)


def test_bn_input_means_are_per_instance_channel_means_of_every_bn_input() -> None:
    net = zoo.build("lenet5-bn", 10, 1).eval()
    x = torch.randn(3, 1, 32, 32)
    means = BNInputMeans(net)
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].mean(dim=(2, 3)))) for m in net.bn_layers()]
    with means.capture():
        net(x)
    for h in hooks:
        h.remove()
    f = means.features()
    assert f.shape == (3, 6 + 16 + 120)
    assert torch.allclose(f, torch.cat(seen, dim=1))


# ----------------------------------------------------------------------------- pool, bank, lowest-loss iterate
def test_ring_buffer_wraps_at_capacity() -> None:
    bank = RingBuffer(5, (2,), torch.float32, torch.device("cpu"))
    rows = lambda a, b: torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 2)  # noqa: E731
    bank.add(rows(0, 3))
    assert (bank.count, bank.index) == (3, 3)
    assert bank.filled()[:, 0].tolist() == [0, 1, 2]
    bank.add(rows(3, 7))  # 3, 4 fill the end; 5, 6 overwrite the oldest two
    assert (bank.count, bank.index, bank.writes) == (5, 2, 7)
    assert bank.data[:, 0].tolist() == [5, 6, 2, 3, 4]
    bank.add(rows(7, 14))  # more than the capacity: only the last five survive
    assert sorted(bank.data[:, 0].tolist()) == [9, 10, 11, 12, 13]
    sample = bank.sample(3)
    assert sample.shape == (3, 2) and len(set(sample[:, 0].tolist())) == 3


def test_pixel_pool_stores_uint8_pixels_and_reads_them_back_normalized() -> None:
    pool = PixelPool(4, 1, 2, torch.device("cpu"))
    pool.add_pixels(torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2))
    assert pool.data.dtype == torch.uint8 and pool.filled().flatten().tolist() == [0, 128, 255, 255]
    images = pool.image_set((0.5,), (0.25,))
    expected = (torch.tensor([0, 128, 255, 255]) / 255 - 0.5) / 0.25
    assert torch.allclose(images.batch(slice(None)).flatten(), expected)


def test_lowest_loss_keeps_the_lowest_iterate() -> None:
    best = LowestLoss()
    for loss, tag in [(3.0, 0), (1.0, 1), (2.0, 2), (0.5, 3), (0.5, 4), (0.7, 5)]:
        best.offer(torch.tensor(loss), torch.full((2, 2), float(tag)), torch.tensor([tag]))
    assert best.loss.item() == 0.5
    assert best.best[0].unique().tolist() == [3.0] and best.best[1].tolist() == [3]  # strict: a tie keeps the first


def toy_context(mnist: TaskData, teacher: nn.Module | None = None) -> DistillContext:
    torch.manual_seed(0)
    teacher = teacher if teacher is not None else zoo.build("lenet5-bn", 10, 1)
    return DistillContext(
        teacher=CountingTeacher(teacher), student=zoo.build("lenet5-half", 10, 1).train(), device=torch.device("cpu"),
        num_classes=10, channels=1, size=32, mean=mnist.mean, std=mnist.std, train_augment=mnist.train_augment,
        _validate=lambda predictor: 0.0, iterations=1, eval_every=1,
    )


@pytest.mark.parametrize("method", [ADI, CMI])
def test_synthesis_returns_its_lowest_loss_iterate(mnist: TaskData, method, monkeypatch) -> None:
    offers: list[tuple[float, torch.Tensor]] = []

    class Spy(LowestLoss):
        def offer(self, loss, *tensors):
            offers.append((loss.item(), tensors[0].detach().clone()))
            super().offer(loss, *tensors)

    monkeypatch.setattr(f"methods.{method.name}.LowestLoss", Spy)
    ctx = toy_context(mnist)
    m = method(method.Hparams(b_syn=8, g_steps=12, bank_size=64) if method is CMI else method.Hparams(b_syn=8, g_steps=12))
    m.setup(ctx)
    pixels, losses = m.synthesize(ctx)
    losses_seen = [loss for loss, _ in offers]
    assert len(offers) == 12 and len(set(losses_seen)) > 1
    lowest = min(range(12), key=lambda i: losses_seen[i])
    assert torch.equal(pixels, offers[lowest][1])
    assert losses["synthesis"].item() == pytest.approx(losses_seen[lowest])
    assert pixels.shape == (8, 1, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1


def test_the_mnist_tv_weight_smooths_the_round_it_returns(mnist: TaskData) -> None:
    """λ_tv is in the round's loss: from the same seed, the MNIST profile's 0.3 returns images with a
    much smaller TV than the CIFAR default 1e-3, whose round keeps most of the init's pixel noise."""
    tv = {}
    for weight in (1e-3, get_method("deepinv").resolve_hparams("quick", "mnist").lambda_tv):
        ctx = toy_context(mnist)
        method = DeepInversion(DeepInversion.Hparams(b_syn=16, g_steps=30, lambda_tv=weight))
        method.setup(ctx)
        torch.manual_seed(1)
        pixels, _ = method.synthesize(ctx)
        tv[weight] = total_variation(pixels).item()
    assert tv[0.3] < 0.3 * tv[1e-3], tv  # measured 6.3 against 78.2 (untrained toy teacher, 30 steps)


def test_pixels_take_adam_steps_in_the_teachers_normalized_units() -> None:
    """The released code runs Adam(lr_g) on the normalized tensor: one step moves a pixel by lr_g·σ_T, not lr_g."""
    mean, std = torch.tensor([0.5, 0.1]).view(1, 2, 1, 1), torch.tensor([0.25, 0.2]).view(1, 2, 1, 1)
    torch.manual_seed(0)
    pixels = Pixels((4, 2, 3, 3), mean, std)
    pixels.reset()
    before = pixels().detach().clone()
    assert before.min() >= 0 and before.max() <= 1 and before.std() > 0.05  # N(0, 1) in normalized space, clamped
    with torch.no_grad():
        pixels.u.clamp_(-1, 1)  # keep every pixel away from the bounds for the step below
    before = pixels().detach().clone()
    opt = torch.optim.Adam(pixels.parameters(), lr=0.1, betas=(0.5, 0.99))
    pixels().sum().backward()  # d/du = σ_T > 0 everywhere: Adam's first step is −lr_g in u
    opt.step()
    step = pixels().detach() - before
    assert torch.allclose(step, (-0.1 * std).expand_as(step), atol=1e-6)
    with torch.no_grad():
        pixels.u.fill_(100.0)
    pixels.clamp_()
    assert torch.allclose(pixels().detach(), torch.ones(4, 2, 3, 3), atol=1e-6)  # clamped at pixel value 1


# ----------------------------------------------------------------------------- CMI's contrast
def test_info_nce_positive_is_the_same_index() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # two positives, then one bank negative
    tau = 0.5
    # anchor 0: dots (1, 0, −1); anchor 1: dots (0, 1, 0); positive at the anchor's own index
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    l1 = -math.log(math.exp(2) / (1 + math.exp(2) + 1))
    assert info_nce(a, keys, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    swapped = keys[[1, 0, 2]]  # positives exchanged: each anchor's positive is now the other instance
    assert info_nce(a, swapped, tau).item() > info_nce(a, keys, tau).item() + 1


def test_contrastive_loss_anchors_local_views_against_their_own_global_view() -> None:
    torch.manual_seed(0)
    head = nn.Identity()
    f = nn.functional.normalize(torch.randn(6, 4), dim=1)
    local = f.clone().requires_grad_()
    global_ = f.clone().requires_grad_()
    negatives = nn.functional.normalize(torch.randn(5, 4), dim=1)
    loss = contrastive_loss(head, local, global_, negatives, 0.1)
    keys = torch.cat([f, negatives])
    expected = -torch.log_softmax(f @ keys.t() / 0.1, dim=1).diagonal().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert local.grad is not None and global_.grad is None  # the positive is detached


# ----------------------------------------------------------------------------- gradient flow during synthesis
def count_student(ctx: DistillContext) -> list[bool]:
    calls: list[bool] = []
    ctx.student.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    return calls


def test_deepinv_never_forwards_the_student_during_synthesis(mnist: TaskData) -> None:
    ctx = toy_context(mnist)
    calls = count_student(ctx)
    method = DeepInversion(DeepInversion.Hparams(b_syn=4, g_steps=5))
    assert method.hp.lambda_adv == 0
    method.setup(ctx)
    method.synthesize(ctx)
    assert calls == []
    assert all(p.grad is None for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert ctx.networks["generator"] == [method.pixels]


def test_adi_and_cmi_reach_the_input_through_a_frozen_student(mnist: TaskData) -> None:
    for cls, hparams in ((ADI, ADIHparams(b_syn=4, g_steps=3)), (CMI, CMIHparams(b_syn=4, g_steps=3, bank_size=16))):
        ctx = toy_context(mnist)
        calls = count_student(ctx)
        method = cls(hparams)
        method.setup(ctx)
        before = {k: v.clone() for k, v in ctx.student.state_dict().items()}
        method.synthesize(ctx)
        assert calls == [True] * 3  # S in train() inside synthesis (spec §1.6)
        assert all(p.grad is None and p.requires_grad for p in ctx.student.parameters())
        assert all(torch.equal(v, before[k]) for k, v in ctx.student.state_dict().items())
    assert set(ctx.networks) == {"generator", "projector"}
    assert method.bank.count == 4  # the round's features joined the bank


def test_cmi_reinitialises_its_one_generator_every_round(mnist: TaskData) -> None:
    ctx = toy_context(mnist)
    method = CMI(CMIHparams(b_syn=4, g_steps=2, bank_size=16, ngf=8, nz=16))
    method.setup(ctx)
    method.synthesize(ctx)
    trained = method.generator.fc.weight.detach().clone()
    method.synthesize(ctx)
    assert len(ctx.networks["generator"]) == 1
    assert not torch.equal(trained, method.generator.fc.weight)
    assert method.generator.fc.weight.std().item() == pytest.approx(0.02, rel=0.3)  # N(0, 0.02), two steps later


def test_kd_warmup_ramps_the_student_lr_over_the_first_epochs_then_follows_the_milestones(mnist: TaskData) -> None:
    # warm-up 2 of 4 epochs, milestone at epoch 3 of 4 (×0.1 from epoch 4), 2 KD steps per epoch: the student's
    # lr per KD step is lr·(1/2, 2/2, 1, 0.1), each twice (spec §4.4 milestones, the warm-up ours)
    student_lrs: list[float] = []
    teacher, student = zoo.build("lenet5-bn", 10, 1), zoo.build("lenet5-half", 10, 1)
    student_params = {id(p) for p in student.parameters()}

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if id(optimizer.param_groups[0]["params"][0]) in student_params:
            student_lrs.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(record)
    try:
        distill(teacher, student, Budget(iterations=4), method="deepinv", data=tiny_task(mnist, 64), profile="quick",
                overrides={"b_syn": 4, "g_steps": 1, "kd_steps": 2, "batch_size": 4, "lr_s": 0.1, "warmup": 2,
                           "milestones": (0.75,), "eval_every": 4, "samples": 4})
    finally:
        handle.remove()
    assert student_lrs == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


# ----------------------------------------------------------------------------- declarations and the CLI
def test_methods_are_registered_with_bn_teachers_and_paper_recipes() -> None:
    assert {"deepinv", "adi", "cmi"} <= set(method_names())
    for name in ("deepinv", "adi", "cmi"):
        cls = get_method(name)
        assert cls.needs_teacher_bn and cls.default_pairs["mnist"] == ("lenet5-bn", "lenet5-half")
    di = get_method("deepinv").resolve_hparams("paper", "cifar10")
    assert (di.b_syn, di.g_steps, di.iterations, di.kd_steps, di.batch_size, di.kd_tau) == (256, 2000, 200, 400, 256, 20)
    assert (di.lambda_bn, di.lambda_oh, di.lambda_adv, di.lambda_tv, di.lambda_l2) == (10, 1, 0, 1e-3, 0)
    assert [round(f * di.iterations) for f in di.milestones] == [120, 150, 180]
    assert get_method("adi").resolve_hparams("paper", "cifar100").lambda_adv == 1
    # MNIST's TV weight is ours (the spec's 1e-3 is CIFAR's); the quick profile keeps the paper profile's weights.
    for name in ("deepinv", "adi"):
        paper, quick = (get_method(name).resolve_hparams(p, "mnist") for p in ("paper", "quick"))
        assert paper.lambda_tv == quick.lambda_tv == 0.3
        assert (paper.lambda_bn, paper.lambda_oh, paper.lambda_adv) == (quick.lambda_bn, quick.lambda_oh, quick.lambda_adv)
    cmi = get_method("cmi").resolve_hparams("paper", "cifar10")
    assert (cmi.b_syn, cmi.batch_size, cmi.g_steps, cmi.kd_steps, cmi.iterations) == (256, 128, 200, 2000, 40)
    assert (cmi.lambda_bn, cmi.lambda_oh, cmi.lambda_adv, cmi.lambda_cr, cmi.cr_T) == (1, 0.5, 0.5, 0.8, 0.1)
    assert (cmi.bank_size, cmi.n_neg, cmi.nz, cmi.head_dim, cmi.cr_features) == (40_960, 4096, 256, 256, "stages")
    assert [round(f * cmi.iterations) for f in cmi.milestones] == [25, 30, 35]
    # CMI's quick MNIST profile keeps the paper profile's losses and weights; its student lr is 0.002, not 0.01:
    # at 0.01 the first KD epoch (200 steps on 128 images) silenced most of LeNet-5-half's conv2 channels for good
    # in the runs that ended under 93% (methods/cmi.py).
    paper, quick = (get_method("cmi").resolve_hparams(p, "mnist") for p in ("paper", "quick"))
    weights = ("lambda_bn", "lambda_oh", "lambda_adv", "lambda_cr", "cr_T", "kd_tau")
    assert [getattr(quick, w) for w in weights] == [getattr(paper, w) for w in weights]
    assert (paper.lr_s, quick.lr_s) == (0.01, 0.002)


def test_a_teacher_without_batchnorm_is_refused_with_one_line(results_dir, data_root, tmp_path) -> None:
    results = tmp_path / "results"
    shutil.copytree(results_dir, results)
    for name in ("cmi", "deepinv"):
        out = CliRunner().invoke(main, ["distill", "--method", name, "--dataset", "mnist", "--teacher", "lenet5",
                                        "--student", "lenet5-half", "--device", "cpu"],
                                 env={"DFKD_RESULTS": str(results), "DFKD_DATA": str(data_root)})
        assert out.exit_code == 2, out.output
        lines = [line for line in out.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "lenet5-bn" in lines[0], out.output


# ----------------------------------------------------------------------------- short real MNIST runs
def tiny_task(mnist: TaskData, n: int = 1000) -> TaskData:
    idx = torch.arange(n)
    return TaskData(mnist.dataset, mnist.num_classes, mnist.channels, mnist.size, mnist.mean, mnist.std,
                    mnist.train_augment, mnist.val.subset(idx), mnist.test.subset(idx))


SHORT = {
    "deepinv": {"b_syn": 64, "g_steps": 40, "kd_steps": 100, "batch_size": 64, "lr_s": 0.03},
    "adi": {"b_syn": 64, "g_steps": 40, "kd_steps": 100, "batch_size": 64, "lr_s": 0.03},
    "cmi": {"b_syn": 64, "g_steps": 20, "kd_steps": 100, "batch_size": 64, "lr_s": 0.03, "n_neg": 64, "ngf": 16},
}


@pytest.mark.parametrize("name", ["deepinv", "adi", "cmi"])
def test_short_mnist_run_learns(mnist: TaskData, lenet5_bn_teacher: nn.Module, name: str, metric_spy) -> None:
    # 3 epochs of 64 images (the quick profile's losses and weights) and 3 x 100 KD steps at B 64.  Measured
    # test accuracy on the 1,000-image subset with the 99.2% LeNet-5-BN teacher (not this module's 2-epoch
    # one), seeds 0 / 1 / 2: deepinv 0.296 / 0.376 / 0.267; seed 0: adi 0.524, cmi 0.511 (seeds 1, 2 not measured).
    # Chance is 0.10 and a constant predictor scores at most ~0.13 here; the threshold is 0.2.
    torch.manual_seed(0)
    student = zoo.build("lenet5-half", 10, 1)
    result = distill(lenet5_bn_teacher, student, Budget(iterations=3), method=name, data=tiny_task(mnist),
                     profile="quick", overrides={**SHORT[name], "eval_every": 3, "samples": 8},
                     callbacks=[metric_spy])
    assert result.test_accuracy > 0.2, result.history[-1].metrics
    assert result.artifacts["samples"].dtype == torch.uint8
    metrics = result.history[-1].metrics
    assert {"loss/kd", "loss/synthesis", "loss/syn_bn"} <= set(metrics)
    assert metric_spy.metrics["synthetic_images"] == 3 * 64
    assert metric_spy.metrics["synthesis_seconds"] > 0 and metric_spy.metrics["kd_steps_per_second"] > 0

