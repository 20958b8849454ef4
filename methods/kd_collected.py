"""KD-collected: distillation on the budgeted collected examples only (spec §4.2).

HiDFD's stage 3 without the synthetic set: the collected images (labels withheld) are repeated
to fill the step budget, augmented independently, and distilled with the SimKD objective (or
plain τ = 4 KD).  HiDFD minus KD-collected measures exactly what the GAN adds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from optuna.distributions import CategoricalDistribution, FloatDistribution

from .core.context import DistillContext
from .core.method import CollectedUse, CommonHparams, Method, hp
from .core.registry import register
from .core.schedules import Schedule
from .core.student_stage import SIMKD_DEPLOYED, StudentStageConfig, hidfd_augment, student_lr, train_student

STEP_MILESTONES = (0.625, 0.75, 0.875)  # epochs 150 / 180 / 210 of 240


@dataclass
class KDCollectedHparams(CommonHparams):
    """HiDFD's student recipe (spec §3.2, MNIST column): SGD 0.05, momentum 0.9, wd 5e-4, B 64, 62,500 steps."""

    iterations: int = hp(62_500, ge=1)
    batch_size: int = hp(64, ge=1)
    eval_every: int = hp(1_563, ge=1)
    objective: Literal["simkd", "kd"] = "simkd"
    tau: float = hp(4.0, gt=0)
    lr: float | None = hp(None, gt=0)  # None: 0.05 for simkd, 0.01 for kd (see student_lr)
    momentum: float = hp(0.9, ge=0, lt=1)
    weight_decay: float = hp(5e-4, ge=0)
    schedule: Schedule = "multistep"
    milestones: tuple[float, ...] = hp(STEP_MILESTONES, ge=0, le=1)


@register("kd-collected")
class KDCollected(Method):
    """SimKD (or KD) on only the budgeted collected examples, repeated to fill the iterations."""

    family = "baseline (collected data)"
    citation = "HiDFD stage 3 without synthetic data (Tang et al., Hybrid Data-Free Knowledge Distillation, 2024)."
    Hparams = KDCollectedHparams
    collected_use = CollectedUse.REQUIRED
    deployed = SIMKD_DEPLOYED
    search_space = {
        "lr": FloatDistribution(0.005, 0.2, log=True),
        "objective": CategoricalDistribution(["simkd", "kd"]),
    }
    profiles = {
        "quick": {"*": {"iterations": 2000, "eval_every": 200}},
        "paper": {
            "mnist": {},
            "fashion-mnist": {},
            "cifar10": {"iterations": 375_000},
            "cifar100": {"iterations": 375_000},
        },
    }

    def run(self, ctx: DistillContext) -> None:
        hp: KDCollectedHparams = self.hp  # type: ignore[assignment]
        lr = student_lr(hp.objective, hp.lr)
        config = StudentStageConfig(hp.objective, hp.tau, 0.0, lr, hp.momentum, hp.weight_decay, hp.schedule, hp.milestones)
        train_student(ctx, ctx.collected(), config, hp.batch_size, hidfd_augment(ctx.channels))
