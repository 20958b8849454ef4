"""Optimizers and learning-rate schedules stepped per iteration (spec §1.2: milestones in iterations)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

Schedule = Literal["none", "cosine", "multistep"]


def sgd(params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def scheduler(
    optimizer: torch.optim.Optimizer,
    kind: Schedule,
    iterations: int,
    milestones: tuple[float, ...] = (),
    gamma: float = 0.1,
    warmup: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-iteration schedule.  ``milestones`` are fractions of ``iterations`` (so quick profiles scale).

    ``warmup``: linear warm-up 0 → lr over that many iterations before the schedule (spec §3.4).
    """
    if kind == "cosine":
        main: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, max(1, iterations - warmup)
        )
    elif kind == "multistep":
        steps = sorted({max(1, round(f * iterations) - warmup) for f in milestones})
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma)
    else:
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if warmup <= 0:
        return main
    ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
