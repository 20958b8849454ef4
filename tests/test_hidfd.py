"""HiDFD (spec §3.2): each loss against its formula on tiny tensors, gradient flow, CFS, the student set, a short run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import methods.hidfd as hidfd
from benchmark import zoo
from methods import BaseCallback, Budget, BudgetError, DfkdError, distill, get_method
from methods.core.biggan import BigGANDiscriminator, BigGANGenerator, EmaGenerator
from methods.core.images import ImageSet
from methods.hidfd import (
    FrequencySmoother,
    adc_d_loss,
    adc_g_loss,
    cfs_loss,
    feature_integration_loss,
    hinge_d_loss,
    hinge_g_loss,
)

C = 3


def manual_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.stack([-(logits[i, target[i]] - logits[i].exp().sum().log()) for i in range(len(target))]).mean()


# ----------------------------------------------------------------------------- losses
def test_hinge_losses_match_formula() -> None:
    adv_real = torch.tensor([2.0, 0.5, -1.0])
    adv_fake = torch.tensor([-2.0, 0.0, 1.5])
    # mean ReLU(1 − d_r) = (0 + 0.5 + 2)/3, mean ReLU(1 + d_f) = (0 + 1 + 2.5)/3
    assert hinge_d_loss(adv_real, adv_fake).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert hinge_g_loss(adv_fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_adc_losses_match_formula() -> None:
    torch.manual_seed(0)
    adc_r, adc_f = torch.randn(4, 2 * C), torch.randn(4, 2 * C)
    y_r, y_f = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 1, 0, 2])
    want_d = manual_ce(adc_r, 2 * y_r) + manual_ce(adc_f, 2 * y_f + 1)
    want_g = manual_ce(adc_f, 2 * y_f) - manual_ce(adc_f, 2 * y_f + 1)
    assert adc_d_loss(adc_r, y_r, adc_f, y_f).item() == pytest.approx(want_d.item(), rel=1e-5)
    assert adc_g_loss(adc_f, y_f).item() == pytest.approx(want_g.item(), rel=1e-5)


def test_feature_integration_has_four_unsquared_terms() -> None:
    torch.manual_seed(0)
    phi_r, phi_f, h_r, h_f = (torch.randn(5, 7) for _ in range(4))

    def term(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(math.sqrt(((a[i] - b[i]) ** 2).sum().item()) for i in range(5)) / 5

    rr, rf, ff, fr = term(phi_r, h_r), term(phi_r, h_f), term(phi_f, h_f), term(phi_f, h_r)
    assert feature_integration_loss(phi_r, phi_f, h_r, h_f).item() == pytest.approx(rr + rf + ff + fr, rel=1e-5)
    assert feature_integration_loss(phi_r, phi_f, h_r, h_f, "matched").item() == pytest.approx(rr + ff, rel=1e-5)
    assert feature_integration_loss(phi_r, phi_f, h_r, h_f, "cross").item() == pytest.approx(rf + fr, rel=1e-5)


def test_feature_integration_trains_the_discriminator_feature_head() -> None:
    """The released code computed L_FI under no_grad; here it must reach D's fi head and backbone."""
    torch.manual_seed(0)
    D = BigGANDiscriminator(C, nc=1, feature_dim=6, ch=1, fi_hidden=8)
    x = torch.randn(8, 1, 32, 32)
    phi = torch.randn(8, 6, requires_grad=True)  # stands for the teacher's features: must stay untouched
    out = D(x)
    feature_integration_loss(phi[:4], phi[4:], out.fi[:4], out.fi[4:]).backward()
    for name, p in D.named_parameters():
        if name.startswith(("fi.", "blocks.")) and "original" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        if name.startswith(("adv.", "adc.")):
            assert p.grad is None, name  # not in L_FI's graph at all
    assert phi.grad is None


def test_cfs_loss_matches_formula() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    w = torch.tensor([0.5, 1.0, 1.5])
    p_bar = F.softmax(logits, 1).mean(0)
    assert cfs_loss(logits, w).item() == pytest.approx((w * p_bar * p_bar.log()).sum().item(), rel=1e-6)


def test_cfs_weights_follow_imbalanced_teacher_counts() -> None:
    smoother = FrequencySmoother(C, torch.device("cpu"), init=50.0, beta=0.99, decay=0.5)
    assert torch.allclose(smoother.weights, torch.ones(C))
    logits = torch.zeros(64, C)
    logits[:60, 0] = 5.0  # 60 fakes predicted class 0, 4 predicted class 1, none class 2
    logits[60:, 1] = 5.0
    smoother.observe(logits)
    smoother.update()
    effective = torch.tensor([0.5 * 50 + 0.5 * 60, 0.5 * 50 + 0.5 * 4, 0.5 * 50])
    assert torch.allclose(smoother.effective, effective)
    w = 0.01 / (1 - 0.99**effective)
    assert torch.allclose(smoother.weights, w * C / w.sum())
    assert smoother.weights.sum().item() == pytest.approx(C)
    assert smoother.weights[0] < smoother.weights[1] < smoother.weights[2]  # over-produced class weighs least
    assert smoother.counts.sum() == 0  # accumulator reset


def test_cfs_static_is_the_released_behaviour() -> None:
    smoother = FrequencySmoother(C, torch.device("cpu"), static=True)
    smoother.observe(torch.tensor([[5.0, 0.0, 0.0]] * 10))
    smoother.update()
    assert torch.allclose(smoother.weights, torch.ones(C))


# ----------------------------------------------------------------------------- networks
def test_generator_emits_the_teacher_normalized_space() -> None:
    torch.manual_seed(0)
    G = BigGANGenerator(C, nc=1, mean=(0.1307,), std=(0.3081,), ch=1)
    z, y = torch.randn(4, G.nz), torch.arange(4) % C
    G.eval()
    pixels = G.pixels(z, y)
    assert pixels.shape == (4, 1, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(G(z, y), (pixels - 0.1307) / 0.3081, atol=1e-6)


def test_ema_is_a_copy_until_start_then_averages() -> None:
    torch.manual_seed(0)
    G = BigGANGenerator(C, nc=1, mean=(0.5,), std=(0.5,), ch=1)
    ema = EmaGenerator(G, decay=0.9, start=1)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    ema.update(G, 1)
    for a, b in zip(ema.model.parameters(), G.parameters(), strict=True):
        assert torch.equal(a, b)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    ema.update(G, 2)
    for a, old, b in zip(ema.model.parameters(), before, G.parameters(), strict=True):
        assert torch.allclose(a, 0.9 * old + 0.1 * b)


# ----------------------------------------------------------------------------- method
def test_declares_the_tunable_hyperparameters() -> None:
    cls = get_method("hidfd")
    defaults = cls.hparam_defaults()
    for name, value in (("lambda_d", 0.1), ("lambda_g", 0.1), ("inflation", 10), ("n_synth", 50_000)):
        assert defaults[name] == value
        assert name in cls.search_space
    assert cls.resolve_hparams("quick", "mnist").gan_iterations < defaults["gan_iterations"]
    with pytest.raises(DfkdError, match="cfs_beta"):
        cls.resolve_hparams("quick", "mnist", {"cfs_beta": "1.5"})


def test_needs_collected_examples(mnist, lenet5_teacher) -> None:
    with pytest.raises(BudgetError):
        distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(collected=0), method="hidfd", data=mnist)


def test_student_set_is_inflated_real_plus_balanced_synthetic(mnist, lenet5_teacher, monkeypatch) -> None:
    captured: dict[str, ImageSet] = {}
    real_synthesize = hidfd.synthesize

    def spy_synthesize(*args, **kwargs):
        captured["synthetic"] = real_synthesize(*args, **kwargs)
        return captured["synthetic"]

    def spy_train_student(ctx, images, config, batch_size, augment):
        captured["student_set"] = images
        captured["collected"] = ctx.collected()
        assert config.objective == "simkd"
        ctx.watch(ctx.student)
        ctx.end_iteration(ctx.iterations)

    monkeypatch.setattr(hidfd, "synthesize", spy_synthesize)
    monkeypatch.setattr(hidfd, "train_student", spy_train_student)
    overrides = {"gan_iterations": 3, "gan_batch_size": 8, "gan_ch": 1, "n_synth": 25, "inflation": 3,
                 "iterations": 1, "cfs_k": 2, "ema_start": 1}
    result = distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(collected=20), method="hidfd",
                     data=mnist, overrides=overrides)
    synthetic, student_set, real = captured["synthetic"], captured["student_set"], captured["collected"]
    assert synthetic.pixels.dtype == torch.uint8 and len(synthetic) == 25
    assert torch.bincount(synthetic.labels, minlength=10).tolist() == [3] * 5 + [2] * 5  # balanced
    assert len(student_set) == 3 * 20 + 25
    real_pixels = real.to_pixels(slice(None)).half()
    for copy in range(3):
        assert torch.equal(student_set.pixels[copy * 20 : (copy + 1) * 20], real_pixels)
    assert torch.equal(student_set.pixels[60:], synthetic.to_pixels(slice(None)).half())
    grid = result.artifacts["samples"]
    assert grid.dtype == torch.uint8 and grid.shape[1] == 2 + 10 * 34  # one row per class


class Recorder(BaseCallback):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)


@pytest.mark.slow
def test_short_mnist_run_learns(mnist, lenet5_teacher) -> None:
    overrides = {"gan_iterations": 30, "gan_batch_size": 32, "gan_ch": 2, "n_synth": 500, "cfs_k": 10,
                 "ema_start": 15, "ema_decay": 0.9, "gan_log_every": 10, "iterations": 300, "eval_every": 300}
    recorder = Recorder()
    result = distill(lenet5_teacher, zoo.build("lenet5-half", 10, 1), Budget(collected=100), method="hidfd",
                     data=mnist, overrides=overrides, callbacks=[recorder])
    assert result.test_accuracy > 0.8  # chance is 0.1; 0.944 / 0.926 / 0.939 over seeds 0-2 (student init, run seed)
    assert {"gan/loss_d", "gan/fi", "gan/cfs", "gan/teacher_agrees"} <= set(recorder.metrics)


def test_ema_averages_bn_buffers_not_sn_vectors_and_differs_from_swa_utils() -> None:
    """Spec §3.2 (4): BN statistics are part of G_ema; SN power-iteration vectors are not averaged."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    G = BigGANGenerator(C, nc=1, mean=(0.5,), std=(0.5,), ch=1)
    ema = EmaGenerator(G, decay=0.9, start=1)
    library = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    library.update_parameters(G)  # its first update is the copy
    buffers = dict(G.named_buffers())
    bn = next(n for n in buffers if n.endswith("running_mean"))
    sn = next(n for n in buffers if n.endswith("._u"))
    count = next(n for n in buffers if n.endswith("num_batches_tracked"))
    old_bn, old_sn = buffers[bn].clone(), dict(ema.model.named_buffers())[sn].clone()
    with torch.no_grad():  # G moves: its BN statistics, SN vector and BN counter change
        buffers[bn].add_(1.0)
        buffers[sn].copy_(torch.nn.functional.normalize(torch.randn_like(buffers[sn]), dim=0))
        buffers[count].add_(7)
    ema.update(G, 2)
    library.update_parameters(G)
    mine, theirs = dict(ema.model.named_buffers()), dict(library.module.named_buffers())
    assert torch.allclose(mine[bn], 0.9 * old_bn + 0.1 * buffers[bn])  # BN running mean averaged
    assert torch.equal(mine[count], buffers[count])  # the counter copied
    assert torch.equal(mine[sn], old_sn)  # the SN vector untouched (refresh() re-estimates it)
    assert torch.allclose(theirs[bn], mine[bn])  # the library agrees on BN statistics...
    assert not torch.allclose(theirs[sn], old_sn)  # ...but averages the SN vector, which the spec does not
