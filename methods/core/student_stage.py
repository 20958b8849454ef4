"""Distilling a student on stored images: KD-ORI (§4.1), KD-collected (§4.2), HiDFD stage 3 (§3.2).

One loop, parameterised by the objective: ``kd`` = τ²·KL_τ(T‖S) (+ ``ce_weight``·CE with true
labels, KD-ORI only) on the plain student; ``simkd`` = L_SimKD on backbone + projector, predicting
through the teacher's frozen head.  SGD with a per-iteration schedule; one student step per
iteration; the teacher only forwards, under ``no_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .context import DistillContext
from .images import Augment, ImageSet, concat
from .losses import cross_entropy, kd_loss
from .schedules import Schedule, scheduler, sgd
from .simkd import Projector, SharedHeadPredictor, simkd_loss


@dataclass
class StudentStageConfig:
    """The hyperparameters of the stored-data student loop."""

    objective: Literal["simkd", "kd"]
    tau: float
    ce_weight: float
    lr: float
    momentum: float
    weight_decay: float
    schedule: Schedule
    milestones: tuple[float, ...]


SIMKD_DEPLOYED = (
    "objective=simkd (default): student backbone + SimKD projector + the teacher's frozen classifier "
    "(spec §2.6; more parameters than the bare student); objective=kd: the bare student"
)


def student_lr(objective: str, lr: float | None) -> float:
    """The student-stage learning rate: ``lr`` when given, else 0.05 for SimKD (HiDFD's recipe, spec §3.2)
    and 0.01 for plain KD [ours]: with the τ² = 16 scaling, KD at 0.05 left LeNet-5-half at chance on
    MNIST (measured: 10.3% vs 91.2% at 0.01 after 300 steps)."""
    if lr is not None:
        return lr
    return 0.05 if objective == "simkd" else 0.01


def inflated_set(real: ImageSet, inflation: int, synthetic: ImageSet | None = None) -> ImageSet:
    """X_c repeated ``inflation`` times, plus the synthetic set (spec §3.2 stage 3); each copy is augmented independently."""
    parts = [real] * inflation
    if synthetic is not None:
        parts.append(synthetic)
    return concat(parts)


def hidfd_augment(channels: int) -> Augment:
    """HiDFD stage-3 augmentation: CIFAR RandomResizedCrop(32, (0.08, 1)) + flip; MNIST RandomCrop(32, 2)."""
    if channels == 1:
        return Augment(crop_padding=2)
    return Augment(resized_crop_scale=(0.08, 1.0), flip=True)


def build_predictor(ctx: DistillContext, objective: str) -> tuple[nn.Module, list[nn.Parameter], SharedHeadPredictor | None]:
    """The module that predicts, the parameters to train, and the SimKD predictor if any."""
    if objective == "kd":
        return ctx.student, list(ctx.student.parameters()), None
    probe = torch.zeros(2, ctx.channels, ctx.size, ctx.size, device=ctx.device)
    with torch.no_grad():
        was = ctx.student.training
        ctx.student.eval()
        s_map = ctx.student.features(probe).map
        ctx.student.train(was)
        t_map = ctx.teacher.net.features(probe).map
    projector = Projector(s_map.shape[1], t_map.shape[1]).to(ctx.device)
    ctx.track("projector", projector, torch.zeros(2, s_map.shape[1], *t_map.shape[-2:], device=ctx.device))
    predictor = SharedHeadPredictor(ctx.student, projector, ctx.teacher.net.head, t_map.shape[-1])
    params = list(ctx.student.parameters()) + list(projector.parameters())
    return predictor, params, predictor


# Largest teacher-output cache (elements) kept for a deterministic pipeline: 64M floats = 256 MB.
TEACHER_CACHE_LIMIT = 64 * 2**20


@torch.no_grad()
def cached_teacher_outputs(ctx: DistillContext, images: ImageSet, objective: str, augment: Augment,
                           steps: int, batch_size: int, chunk: int = 2048) -> Tensor | None:
    """The teacher's target for every stored image (logits for ``kd``, feature map for ``simkd``), computed once.

    Only when the pipeline is deterministic (``augment`` is the identity, e.g. KD-ORI on MNIST, spec §2.9:
    no MNIST augmentation) and the run sees more than one pass of ``images`` (``steps·batch_size``
    samples): the frozen teacher (spec §1.6) then gives each image the same output every epoch, so one
    pass replaces one teacher forward per step.  ``None`` (compute per batch) otherwise, or when the cache
    would exceed :data:`TEACHER_CACHE_LIMIT` elements.
    """
    if not augment.is_identity or steps * batch_size <= len(images):
        return None
    if objective == "kd" and ctx.num_classes * len(images) > TEACHER_CACHE_LIMIT:
        return None  # known before any forward; a feature map's size is known after the first chunk
    parts: list[Tensor] = []
    with ctx.autocast():
        for start in range(0, len(images), chunk):
            out = ctx.teacher.features(images.batch(slice(start, start + chunk)))
            parts.append(out.logits if objective == "kd" else out.map)
            if parts[0][0].numel() * len(images) > TEACHER_CACHE_LIMIT:
                return None
    return torch.cat(parts)


def train_student(ctx: DistillContext, images: ImageSet, config: StudentStageConfig, batch_size: int, augment: Augment) -> None:
    """Run ``ctx.iterations`` student steps on minibatches of ``images`` (spec §4.1, §4.2, §3.2 stage 3).

    With a deterministic pipeline the teacher's outputs come from :func:`cached_teacher_outputs`.
    """
    predictor, params, shared = build_predictor(ctx, config.objective)
    ctx.watch(predictor)
    opt = sgd(params, config.lr, config.momentum, config.weight_decay)
    sched = scheduler(opt, config.schedule, ctx.iterations, config.milestones)
    sampler = images.sampler(batch_size)
    ctx.keep(opt_student=opt, sched_student=sched, sampler_student=sampler)
    if shared is not None:
        ctx.keep(projector=shared.projector)
    cache = cached_teacher_outputs(ctx, images, config.objective, augment, ctx.iterations, batch_size)
    predictor.train()
    for iteration in ctx.steps(ctx.iterations):
        idx = sampler.next()
        x = images.batch(idx, augment)
        with ctx.autocast():
            if cache is not None:
                target = cache[idx]
            else:
                with torch.no_grad():
                    t = ctx.teacher.features(x)
                target = t.logits if shared is None else t.map
            if shared is not None:
                loss = simkd_loss(shared.projected(x), target)
            else:
                s_logits = ctx.student(x)
                loss = kd_loss(target, s_logits, config.tau)
                if config.ce_weight > 0:
                    assert images.labels is not None
                    loss = loss + config.ce_weight * cross_entropy(s_logits, images.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ctx.end_iteration(iteration, {"student": loss})
