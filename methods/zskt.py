"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (spec §4.5).

A generator G seeks inputs on which the student S's beliefs differ most from the teacher T's
(forward KL), and S learns to match T there, outputs and attention maps.  Per pseudo-batch
(= one iteration, spec §1.2), on one z ~ N(0, I):

1. one G step on L_G = −KL_1(T‖S)/C with x = G(z), the gradient flowing through T and S;
2. ``student_steps`` (10) S steps on the same z, x = sg G(z) after the G step, on
   L_S = KL_1(sg T‖S)/C + β·Σ_pairs AT(F_S, sg F_T), β = 250 (spec §2.8 pairs; LeNet conv1/conv2).

The /C reproduces the released code's element-wise mean (``F.kl_div``'s default reduction).  G's
output, T's logits and T's attention stages are computed once after the G step and cached across
the S steps (G does not change in between, T is frozen: the same values the released code
recomputes).  Both optimizers are Adam (lr_S 2e-3, lr_G 1e-3) with cosine annealing over all
pseudo-batches; every step clips its network's gradient norm to 5.

Networks: GeneratorA(nz 100) without the final tanh (spec §2.2; the released 10×10 start with ×1.6
upsampling is cosmetic, not reproduced).  Modes (spec §1.6): T frozen in eval; S in train() also
inside G steps, with its parameter gradients off there; G in train() while training.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from optuna.distributions import FloatDistribution
from torch import Tensor, nn

from .core.attention import at_pairs_loss
from .core.conditional import frozen_parameters
from .core.context import DistillContext
from .core.generators import GeneratorA
from .core.losses import kl_divergence
from .core.method import CollectedUse, CommonHparams, Method, hp
from .core.registry import register
from .core.samples import sample_grid
from .core.schedules import Schedule, scheduler

# Quick CPU profile [ours, spec §6]: width, length and evaluation period only; losses, β, the
# 1 G : 10 S ratio, B 128, optimizers, clipping and the cosine shape over the run are the paper's.
# 400 pseudo-batches (4,000 S steps) at ngf 8: measured 0.41 s CPU per pseudo-batch (0.52 at ngf 16;
# the 10 S steps dominate).  Seed 0, lenet5-bn: 200 pseudo-batches ended at 60.5 ± 11.0% over seeds 0-2,
# 500 at 76.2% (best-val checkpoint 83.6%): ZSKT needs far more than a CPU minute (the paper: 80,000).
QUICK = {"ngf": 8, "iterations": 400, "eval_every": 40}


@dataclass
class ZSKTHparams(CommonHparams):
    """The paper recipe (spec §4.5), one for every dataset: B 128, 80,000 pseudo-batches.

    ``iterations`` counts pseudo-batches; ``student_steps`` S steps follow each G step on the same z.
    ``clip_norm``: gradient-norm clip of every G and S step (0 turns it off).  ``schedule`` applies
    to S and G over all pseudo-batches.  ``fused_upsample``: an execution option of GeneratorA
    (same function).  ``samples``: images in the final sample grid.
    """

    iterations: int = hp(80_000, ge=1)
    batch_size: int = hp(128, ge=2)
    eval_every: int = hp(800, ge=1)
    student_steps: int = hp(10, ge=1)
    nz: int = hp(100, ge=1)
    ngf: int = hp(64, ge=1)
    beta: float = hp(250.0, ge=0)
    lr_s: float = hp(2e-3, gt=0)
    lr_g: float = hp(1e-3, gt=0)
    schedule: Schedule = "cosine"
    clip_norm: float = hp(5.0, ge=0)
    fused_upsample: bool = True
    samples: int = hp(64, ge=1)


# ----------------------------------------------------------------------------- losses (spec §4.5)
def belief_divergence(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL_1(T‖S)/C: the batch-mean KL divided by the number of classes (the released element-wise mean)."""
    return kl_divergence(teacher_logits, student_logits) / teacher_logits.shape[1]


def generator_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """L_G = −KL_1(T‖S)/C: G maximises the belief mismatch, gradient through T and S."""
    return -belief_divergence(teacher_logits, student_logits)


def student_loss(teacher_logits: Tensor, student_logits: Tensor, teacher_stages: list[Tensor],
                 student_stages: list[Tensor], beta: float) -> dict[str, Tensor]:
    """L_S = KL_1(sg T‖S)/C + β·Σ_pairs AT(F_S, sg F_T), with its named terms."""
    kl = belief_divergence(teacher_logits.detach(), student_logits)
    at = at_pairs_loss(student_stages, [t.detach() for t in teacher_stages])
    return {"student": kl + beta * at, "s_kl": kl, "s_at": at}


# ----------------------------------------------------------------------------- one pseudo-batch
def clipped_step(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Clip the gradient norm of ``params`` to ``max_norm`` (0: no clip), then step; no host sync."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # returns the norm as a tensor: left unread
    optimizer.step()


def generator_step(ctx: DistillContext, generator: nn.Module, opt_g: torch.optim.Optimizer, z: Tensor,
                   clip_norm: float) -> Tensor:
    """One G step on −KL(T‖S)/C at x = G(z); S in train() with its parameter gradients off. Returns L_G (detached)."""
    student = ctx.student
    with frozen_parameters(student), ctx.autocast():
        x = generator(z)
        loss = generator_loss(ctx.teacher(x), student(x))
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    clipped_step(opt_g, generator.parameters(), clip_norm)
    return loss.detach()


def student_steps(ctx: DistillContext, generator: nn.Module, opt_s: torch.optim.Optimizer, z: Tensor,
                  hp: ZSKTHparams) -> dict[str, Tensor]:
    """``hp.student_steps`` S steps on x = sg G(z), T's outputs computed once; returns the mean terms (detached)."""
    with torch.no_grad(), ctx.autocast():
        x = generator(z)
        t = ctx.teacher.features(x)
    sums: dict[str, Tensor] = {}
    for _ in range(hp.student_steps):
        with ctx.autocast():
            s = ctx.student.features(x)
            terms = student_loss(t.logits, s.logits, t.stages, s.stages, hp.beta)
        opt_s.zero_grad(set_to_none=True)
        terms["student"].backward()
        clipped_step(opt_s, ctx.student.parameters(), hp.clip_norm)
        for key, value in terms.items():
            sums[key] = sums[key] + value.detach() if key in sums else value.detach()
    return {key: value / hp.student_steps for key, value in sums.items()}


@register("zskt")
class ZSKT(Method):
    """Per pseudo-batch: one G step on −KL/C, then 10 S steps on the same z on KL/C + β·AT (spec §4.5)."""

    family = "adversarial generator"
    citation = (
        "Micaelli, Storkey. Zero-shot Knowledge Transfer via Adversarial Belief Matching. NeurIPS 2019 "
        "(arXiv:1905.09768)."
    )
    notes = ("KL/C as the released element-wise mean; teacher outputs cached across the 10 S steps; "
             "MNIST attention pairs LeNet conv1/conv2 [ours].")
    Hparams = ZSKTHparams
    collected_use = CollectedUse.NONE
    search_space = {
        "beta": FloatDistribution(10.0, 1000.0, log=True),
        "lr_s": FloatDistribution(2e-4, 2e-2, log=True),
        "lr_g": FloatDistribution(1e-4, 1e-2, log=True),
    }
    profiles = {
        "paper": {"mnist": {}, "fashion-mnist": {}, "cifar10": {}, "cifar100": {}},
        "quick": {"mnist": QUICK, "fashion-mnist": QUICK, "cifar10": QUICK, "cifar100": QUICK},
    }

    def run(self, ctx: DistillContext) -> None:
        hp: ZSKTHparams = self.hp  # type: ignore[assignment]
        device = ctx.device
        generator = GeneratorA(hp.nz, hp.ngf, ctx.channels, ctx.size, final_tanh=False,
                               fused_upsample=hp.fused_upsample).to(device).train()
        ctx.track("generator", generator, torch.randn(2, hp.nz, device=device))
        student = ctx.student.train()
        ctx.watch(student)

        opt_s = torch.optim.Adam(student.parameters(), lr=hp.lr_s)
        opt_g = torch.optim.Adam(generator.parameters(), lr=hp.lr_g)
        schedules = [scheduler(opt, hp.schedule, ctx.iterations) for opt in (opt_s, opt_g)]
        ctx.keep(generator=generator, opt_s=opt_s, opt_g=opt_g, sched_s=schedules[0], sched_g=schedules[1])

        for iteration in ctx.steps(ctx.iterations):
            z = torch.randn(hp.batch_size, hp.nz, device=device)
            loss_g = generator_step(ctx, generator, opt_g, z, hp.clip_norm)
            terms = student_steps(ctx, generator, opt_s, z, hp)
            for schedule in schedules:
                schedule.step()
            ctx.end_iteration(iteration, {**terms, "generator": loss_g})

        ctx.log_metrics(ctx.iterations, {
            "steps/student": ctx.iterations * hp.student_steps,
            "steps/generator": ctx.iterations,
            "student_images": ctx.iterations * (hp.student_steps + 1) * hp.batch_size,
        })
        ctx.add_artifact("samples", sample_grid(ctx, generator, hp.samples, hp.nz))
