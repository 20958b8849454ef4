"""Helpers for methods with a class-conditional generator (CPSC §3.4, CGDD §3.3).

Preset labels y are drawn uniformly (spec §1.1); z ~ N(0, I).  After training, a method shows a
sample grid (one row per class) and measures how often the teacher assigns each sample its preset
label.  Both diagnostics use the raw teacher under ``no_grad`` and do not count as training images.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .context import DistillContext
from .modes import eval_mode


def sample_conditional(generator: nn.Module, batch: int, num_classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Fresh (z, y): z ~ N(0, I) of the generator's ``nz``, y uniform over the classes."""
    z = torch.randn(batch, generator.nz, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    return z, y


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Disable ``module``'s parameter gradients inside the block (spec §1.6: S inside G steps); mode unchanged."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def class_sample_grid(generator: nn.Module, ctx: DistillContext, per_class: int = 8) -> Tensor:
    """A uint8 grid (3×H×W, CPU) from G in eval mode: row c holds ``per_class`` samples of class c."""
    from torchvision.utils import make_grid

    y = torch.arange(ctx.num_classes, device=ctx.device).repeat_interleave(per_class)
    z = torch.randn(y.shape[0], generator.nz, device=ctx.device)
    with eval_mode(generator):
        x = generator(z, y).float()
    pixels = ctx.denormalize(x).clamp(0, 1)
    grid = make_grid(pixels, nrow=per_class, padding=2)
    return (grid * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def label_agreement(generator: nn.Module, teacher: nn.Module, num_classes: int, device: torch.device,
                    per_class: int = 100) -> float:
    """Fraction of samples of G (eval mode) whose teacher argmax equals their preset label (chance 1/C)."""
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    z = torch.randn(y.shape[0], generator.nz, device=device)
    with eval_mode(generator):
        x = generator(z, y)
    return (teacher(x).argmax(1) == y).float().mean().item()


def report_generator(ctx: DistillContext, generator: nn.Module, per_class: int = 8) -> None:
    """Attach the ``samples`` grid artifact and log ``generator/label_agreement`` at the last iteration."""
    ctx.add_artifact("samples", class_sample_grid(generator, ctx, per_class))
    agreement = label_agreement(generator, ctx.teacher.net, ctx.num_classes, ctx.device)
    ctx.log_metrics(ctx.iterations, {"generator/label_agreement": agreement})
