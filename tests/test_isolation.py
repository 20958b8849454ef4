"""Step isolation of the adversarial methods (spec §1.6; DFAD's is in test_dfad.py).

Each step function is called on tiny random networks.  For every step: which parameters change and
which must not (the teacher never, buffers included); S frozen in G steps while in ``train()``, its
gradients re-enabled afterwards; D unchanged in G steps and trainable again afterwards; and where
the spec makes the generator loss flow through T and S (or D), a gradient reaches their inputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark import zoo
from methods.cgdd import CGDD, CGDDHparams
from methods.core.biggan import BigGANDiscriminator, BigGANGenerator
from methods.core.context import CountingTeacher, DistillContext
from methods.core.generators import GeneratorD
from methods.core.hooks import BNStatisticsLoss
from methods.core.images import Augment
from methods.cpsc import CPSC, CPSCHparams
from methods.hidfd import HiDFDHparams, discriminator_step, generator_step

MEAN, STD = (0.1307,), (0.3081,)


def make_ctx(teacher_arch: str = "lenet5", seed: int = 0) -> DistillContext:
    torch.manual_seed(seed)
    teacher = CountingTeacher(zoo.build(teacher_arch, 10, 1))
    student = zoo.build("lenet5-half", 10, 1).train()
    return DistillContext(teacher=teacher, student=student, device=torch.device("cpu"), num_classes=10, channels=1,
                          size=32, mean=MEAN, std=STD, train_augment=Augment(), _validate=lambda predictor: 0.0,
                          iterations=1, eval_every=1)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (e.g. BN running statistics), copied."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def same_parameters(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Parameters only: a generator in train() still updates its BN running statistics when it only samples."""
    return all(torch.equal(p.detach(), before[k]) for k, p in module.named_parameters())


def changed_parameters(module: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, p in module.named_parameters() if not torch.equal(p.detach(), before[k])}


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def same_grads(module: nn.Module, before: list[torch.Tensor | None]) -> bool:
    return all((a is None and p.grad is None) or (a is not None and p.grad is not None and torch.equal(p.grad, a))
               for p, a in zip(module.parameters(), before, strict=True))


class Probe:
    """On a network's first conv: the mode at each forward, and the gradient that reaches its input."""

    def __init__(self, network: nn.Module) -> None:
        self.conv = next(m for m in network.modules() if isinstance(m, nn.Conv2d))
        self.network = network
        self.modes: list[bool] = []
        self.input_grads: list[float] = []
        self.handle = self.conv.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.modes.append(self.network.training)
        x = args[0]
        if x.requires_grad:
            x.register_hook(lambda g: self.input_grads.append(g.abs().sum().item()))

    def remove(self) -> None:
        self.handle.remove()


def teacher_is_untouched(ctx: DistillContext, before: dict[str, torch.Tensor]) -> None:
    assert unchanged(ctx.teacher.net, before)  # weights and BN running statistics
    assert all(p.grad is None and not p.requires_grad for p in ctx.teacher.net.parameters())
    assert not any(m.training for m in ctx.teacher.net.modules())


# ----------------------------------------------------------------------------- HiDFD (spec §3.2, stage 1)
HIDFD = HiDFDHparams(gan_batch_size=8, gan_ch=1, nz=16)


def hidfd_networks(ctx: DistillContext):
    G = BigGANGenerator(10, 1, MEAN, STD, ch=HIDFD.gan_ch, nz=HIDFD.nz).train()
    D = BigGANDiscriminator(10, 1, feature_dim=120, ch=HIDFD.gan_ch, fi_hidden=16).train()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-2, betas=(0.0, 0.999))
    return G, D, opt_g, opt_d


def real_batch(ctx: DistillContext, n: int = 8):
    x_r = torch.randn(n, 1, 32, 32)
    with torch.no_grad():
        t = ctx.teacher.net.features(x_r)
    return x_r, t.logits.argmax(1), t.vec


def test_hidfd_d_step_updates_only_d_and_builds_no_generator_graph() -> None:
    ctx = make_ctx()
    G, D, _, opt_d = hidfd_networks(ctx)
    x_r, y_r, phi_r = real_batch(ctx)
    before_t, before_g, before_d = state(ctx.teacher.net), state(G), state(D)
    probe_t = Probe(ctx.teacher.net)
    discriminator_step(ctx, G, D, opt_d, x_r, y_r, phi_r, HIDFD)
    probe_t.remove()
    assert same_parameters(G, before_g) and all(p.grad is None for p in G.parameters())  # G only provides samples
    moved = changed_parameters(D, before_d)
    for head in ("adv.", "adc.", "fi."):  # hinge, ADC and L_FI all train D (L_FI: its fi head, spec §3.2 table)
        assert any(name.startswith(head) for name in moved), (head, sorted(moved))
    assert probe_t.input_grads == [] and probe_t.modes == [False]  # φ_T(x_f) under no_grad, T in eval
    teacher_is_untouched(ctx, before_t)


def test_hidfd_g_step_updates_only_g_with_gradient_through_d_and_the_teacher() -> None:
    ctx = make_ctx()
    G, D, opt_g, opt_d = hidfd_networks(ctx)
    discriminator_step(ctx, G, D, opt_d, *real_batch(ctx), HIDFD)  # D holds gradients from its own step
    before_t, before_g, before_d, d_grads = state(ctx.teacher.net), state(G), state(D), grads(D)
    probe_t, probe_d = Probe(ctx.teacher.net), Probe(D)
    generator_step(ctx, G, D, opt_g, torch.ones(10), HIDFD)
    probe_t.remove()
    probe_d.remove()
    assert same_parameters(D, before_d)  # D frozen in the G step (its spectral-norm power iteration still runs) ...
    assert same_grads(D, d_grads)  # ... accumulates nothing ...
    assert all(p.requires_grad for p in D.parameters())  # ... and is trainable again afterwards
    assert changed_parameters(G, before_g)
    assert len(probe_d.input_grads) == 1 and probe_d.input_grads[0] > 0  # L_hinge^G, L_ADC^G: through D
    assert len(probe_t.input_grads) == 1 and probe_t.input_grads[0] > 0  # L_CFS: through the frozen T
    teacher_is_untouched(ctx, before_t)


# ----------------------------------------------------------------------------- CGDD (spec §3.3)
CGDD_HP = CGDDHparams(batch_size=8, nz=16, ngf=4)


def cgdd_setup():
    ctx = make_ctx()
    G = GeneratorD(10, CGDD_HP.nz, CGDD_HP.ngf, 1, 32).train()
    opt_s = torch.optim.SGD(ctx.student.parameters(), lr=0.1, momentum=0.9)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2)
    return ctx, G, opt_s, opt_g


def test_cgdd_student_step_updates_only_the_student() -> None:
    ctx, G, opt_s, _ = cgdd_setup()
    before_t, before_g, before_s = state(ctx.teacher.net), state(G), state(ctx.student)
    probe_s, probe_t = Probe(ctx.student), Probe(ctx.teacher.net)
    CGDD._student_step(ctx, G, opt_s, CGDD_HP)
    probe_s.remove()
    probe_t.remove()
    assert changed_parameters(ctx.student, before_s)
    assert probe_s.modes == [True] and probe_s.input_grads == []  # x = sg G(z, y): nothing flows to G
    assert same_parameters(G, before_g) and all(p.grad is None for p in G.parameters())
    assert probe_t.modes == [False] and probe_t.input_grads == []
    teacher_is_untouched(ctx, before_t)


def test_cgdd_generator_step_freezes_s_in_train_mode_and_flows_through_t_and_s() -> None:
    ctx, G, opt_s, opt_g = cgdd_setup()
    CGDD._student_step(ctx, G, opt_s, CGDD_HP)
    before_t, before_g, before_s, s_grads = state(ctx.teacher.net), state(G), state(ctx.student), grads(ctx.student)
    probe_s, probe_t = Probe(ctx.student), Probe(ctx.teacher.net)
    CGDD._generator_step(ctx, G, None, opt_g, CGDD_HP)
    probe_s.remove()
    probe_t.remove()
    assert probe_s.modes == [True]  # S stays in train() inside the G step (spec §1.6)
    assert unchanged(ctx.student, before_s) and same_grads(ctx.student, s_grads)
    assert all(p.requires_grad for p in ctx.student.parameters())
    assert changed_parameters(G, before_g)
    assert len(probe_s.input_grads) == 1 and probe_s.input_grads[0] > 0  # −λ_adv·L1(z_T, z_S): through S
    assert len(probe_t.input_grads) == 1 and probe_t.input_grads[0] > 0  # CE(z_T, y) and L1: through T
    teacher_is_untouched(ctx, before_t)


# ----------------------------------------------------------------------------- CPSC (spec §3.4)
CPSC_HP = CPSCHparams(batch_size=8, nz=16, ngf=4)


def cpsc_setup():
    ctx = make_ctx("lenet5-bn")
    G = GeneratorD(10, CPSC_HP.nz, CPSC_HP.ngf, 1, 32).train()
    adapter = CPSC._adapter(ctx, CPSC_HP.adapter_renorm)
    bn = BNStatisticsLoss(ctx.teacher.net)
    assert bn.available
    opt_s = torch.optim.SGD(ctx.student.parameters(), lr=0.1, momentum=0.9)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.999))
    return ctx, G, adapter, bn, opt_s, opt_g


@pytest.mark.parametrize("with_bn", [True, False])
def test_cpsc_generator_step_freezes_s_and_the_adapter_and_flows_through_t_and_s(with_bn: bool) -> None:
    ctx, G, adapter, bn, opt_s, opt_g = cpsc_setup()
    CPSC._student_step(ctx, G, "log", opt_s, CPSC_HP)
    before = {"t": state(ctx.teacher.net), "g": state(G), "s": state(ctx.student), "a": state(adapter)}
    s_grads = grads(ctx.student)
    probe_s, probe_t = Probe(ctx.student), Probe(ctx.teacher.net)
    terms = CPSC._generator_step(ctx, G, adapter, bn if with_bn else None, "log", opt_g, CPSC_HP)
    probe_s.remove()
    probe_t.remove()
    assert probe_s.modes == [True]  # S in train() inside the G step
    assert unchanged(ctx.student, before["s"]) and same_grads(ctx.student, s_grads)
    assert all(p.requires_grad for p in ctx.student.parameters())
    assert unchanged(adapter, before["a"]) and all(p.grad is None for p in adapter.parameters())  # frozen at init
    assert changed_parameters(G, before["g"])
    assert len(probe_s.input_grads) == 1 and probe_s.input_grads[0] > 0  # −KL(T‖S), IKD, SCL: through S
    assert len(probe_t.input_grads) == 1 and probe_t.input_grads[0] > 0  # KL, BN, SCL (u_T not detached), CE
    assert (terms["g_bn"].item() > 0) == with_bn
    assert all(not layer._forward_hooks for layer in bn.layers)  # BN hooks off again after the G step
    teacher_is_untouched(ctx, before["t"])


def test_cpsc_student_step_updates_only_the_student() -> None:
    ctx, G, adapter, bn, opt_s, _ = cpsc_setup()
    before_t, before_g, before_s = state(ctx.teacher.net), state(G), state(ctx.student)
    probe_s, probe_t = Probe(ctx.student), Probe(ctx.teacher.net)
    CPSC._student_step(ctx, G, "log", opt_s, CPSC_HP)
    probe_s.remove()
    probe_t.remove()
    assert changed_parameters(ctx.student, before_s)
    assert probe_s.modes == [True] and probe_s.input_grads == []  # on sg x
    assert same_parameters(G, before_g) and all(p.grad is None for p in G.parameters())
    assert probe_t.modes == [False] and probe_t.input_grads == []  # T under no_grad
    teacher_is_untouched(ctx, before_t)
