"""CGDD (spec §3.3, reconstruction) and attention transfer (§2.8)."""
from __future__ import annotations

import math

import pytest
import torch

from benchmark import zoo
from methods import cgdd, get_method
from methods.cgdd import CGDDHparams, generator_loss, student_loss
from methods.core.attention import at_loss, at_pairs, at_pairs_loss, attention_map


# ----------------------------------------------------------------------------- loss terms
def test_generator_loss_terms_on_tiny_tensors() -> None:
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0])
    bn = torch.tensor(0.5)
    terms = generator_loss(t, s, y, bn, CGDDHparams(lambda_ce=2.0, lambda_adv=3.0, lambda_bn=4.0))
    ce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.e)) / 2  # −log softmax(t)[y]
    l1 = (1 + 0 + 0 + 2) / 4
    assert terms["g_sup"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["g_adv"].item() == pytest.approx(-l1)
    assert terms["generator"].item() == pytest.approx(2 * ce - 3 * l1 + 4 * 0.5, rel=1e-6)


def test_student_loss_terms_on_tiny_tensors() -> None:
    t = torch.tensor([[2.0, 0.0]])
    s = torch.tensor([[1.0, 1.0]], requires_grad=True)
    y = torch.tensor([1])
    # one 1×1×2 map pair: a(F_S) = (1, 0), a(F_T) = (0, 1) → AT = mean((1, −1)²) = 1
    f_s = torch.tensor([[[[1.0, 0.0]]]])
    f_t = torch.tensor([[[[0.0, 3.0]]]])
    terms = student_loss(t, s, [f_t], [f_s], y, CGDDHparams(lambda_at=10.0, lambda_sce=0.5))
    assert terms["s_kd"].item() == pytest.approx(1.0)  # (|2−1| + |0−1|) / 2
    assert terms["s_at"].item() == pytest.approx(1.0)
    assert terms["s_ce"].item() == pytest.approx(math.log(2))  # equal student logits
    assert terms["student"].item() == pytest.approx(1.0 + 10.0 + 0.5 * math.log(2), rel=1e-6)
    assert "s_ce" not in student_loss(t, s, [f_t], [f_s], y, CGDDHparams())  # λ_sce = 0 by default


def test_attention_transfer_is_zero_when_maps_agree() -> None:
    torch.manual_seed(0)
    f = torch.randn(4, 6, 7, 7)
    assert at_loss(f, f).item() == pytest.approx(0.0, abs=1e-8)
    # attention maps are channel means of F², L2-normalized: scale and channel count do not matter
    assert at_loss(2 * f, f).item() == pytest.approx(0.0, abs=1e-8)
    assert at_loss(f[:, :3], torch.cat([f[:, :3], f[:, :3]], dim=1)).item() == pytest.approx(0.0, abs=1e-8)
    assert at_loss(f, torch.randn(4, 6, 7, 7)).item() > 0
    assert attention_map(f).shape == (4, 49)


def test_attention_pairs_follow_shared_resolutions() -> None:
    x = torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        t = zoo.build("lenet5", 10, 1).features(x).stages
        s = zoo.build("lenet5-half", 10, 1).features(x).stages
    pairs = at_pairs(s, t)  # LeNet: conv1 (28²) and conv2 (10²)
    assert [(a.shape[1:], b.shape[1:]) for a, b in pairs] == [((3, 28, 28), (6, 28, 28)), ((8, 10, 10), (16, 10, 10))]
    # VGG-11 (32, 16, 8, 4, 2 px) → ResNet-18 (32, 16, 8, 4 px): the four shared sizes
    vgg = [torch.zeros(1, 4, n, n) for n in (32, 16, 8, 4, 2)]
    r18 = [torch.zeros(1, 4, n, n) for n in (32, 16, 8, 4)]
    assert [a.shape[-1] for a, _ in at_pairs(r18, vgg)] == [32, 16, 8, 4]
    # no shared size: pair in order, pooling the larger map
    assert at_pairs_loss([torch.ones(2, 3, 8, 8)], [torch.ones(2, 5, 4, 4)]).item() == pytest.approx(0.0, abs=1e-8)


def test_reconstruction_is_marked() -> None:
    info = get_method("cgdd").describe()
    assert info["notes"].startswith("reconstruction")
    assert "reconstruction" in (cgdd.__doc__ or "")


# ----------------------------------------------------------------------------- method runs
def test_short_mnist_run_learns(lenet5_teacher, data_free_run) -> None:
    # quick profile (ngf 16, B 128) for 60 iterations: test 0.65 / 0.69 / 0.62 over seeds 0-2 (2-epoch teacher,
    # idle 2-core CPU, ≈ 25 s); the former ngf 8, B 64, lr_s 0.05 variant swung between 0.10 and 0.35
    result = data_free_run("cgdd", lenet5_teacher, iterations=60, eval_every=60)
    assert result.test_accuracy > 0.4  # chance is 0.1
    assert result.artifacts["samples"].dtype == torch.uint8
    assert not result.flags  # λ_bn = 0: no BN term, nothing to flag with LeNet-5


def test_generator_produces_requested_classes(lenet5_teacher, data_free_run, metric_spy) -> None:
    # 100 G steps (quick size: ngf 16, B 128) against a fixed (lr_s = 0) student: CCBN's class embeddings
    # must carry the label.  Agreement 0.81 / 0.64 / 0.82 over seeds 0-2 (≈ 18 s); ngf 8, B 32 gave 0.28-0.38.
    data_free_run("cgdd", lenet5_teacher, callbacks=[metric_spy], iterations=100, s_steps=1, lr_s=0.0, lr_g=0.01, eval_every=100)
    assert metric_spy.metrics["generator/label_agreement"] > 0.4  # chance is 0.1


def test_bn_prior_is_flagged_without_teacher_bn(lenet5_teacher, data_free_run) -> None:
    result = data_free_run("cgdd", lenet5_teacher, iterations=1, batch_size=8, ngf=4, s_steps=1, lambda_bn=1.0, eval_every=1)
    assert "bn_loss_unavailable" in result.flags


def test_update_order_is_k_student_steps_then_one_generator_step(lenet5_teacher, monkeypatch, data_free_run) -> None:
    from methods.cgdd import CGDD

    order: list[str] = []
    for name, tag in (("_student_step", "S"), ("_generator_step", "G")):
        original = getattr(CGDD, name)

        def spy(*args, _original=original, _tag=tag, **kwargs):
            order.append(_tag)
            return _original(*args, **kwargs)

        monkeypatch.setattr(CGDD, name, staticmethod(spy))
    result = data_free_run("cgdd", lenet5_teacher, iterations=2, batch_size=8, ngf=4, eval_every=2)
    assert order == (["S"] * 5 + ["G"]) * 2
    assert result.teacher_images == 2 * 6 * 8  # one teacher forward per step
