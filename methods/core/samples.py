"""The sample-grid artifact of unconditional generators (DFAD, DAFL, ZSKT)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from .context import DistillContext


@torch.no_grad()
def sample_grid(ctx: DistillContext, generator: nn.Module, n: int, nz: int) -> Tensor:
    """A uint8 (C, H, W) grid of ``n`` samples of G in eval mode, in pixel space clamped to [0, 1] (spec §1.3)."""
    was = generator.training
    generator.eval()
    x = generator(torch.randn(n, nz, device=ctx.device)).float()
    generator.train(was)
    grid = make_grid(ctx.denormalize(x).clamp(0, 1), nrow=8, padding=2)
    return grid.mul(255).round().to(torch.uint8).cpu()
