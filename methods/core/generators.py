"""Generators shared by the adversarial methods: GeneratorA (spec §2.2) and GeneratorD (spec §2.3).

Both emit tensors in the teacher's normalized input space (spec §1.3 rule 2): the final BN
(affine-free, or class-conditional) standardizes the batch and *is* the input; never clamp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _phase_kernels(weight: Tensor) -> Tensor:
    """The four 2×2 kernels equivalent to a 3×3 kernel applied after nearest ×2 upsampling.

    Output row 2i+a of conv3×3(up2(x)) reads input rows (i−1, i) with row taps (w0, w1+w2) when
    a = 0, and rows (i, i+1) with taps (w0+w1, w2) when a = 1; columns likewise.  Returns the
    kernels of phases (a, b) = (0,0), (0,1), (1,0), (1,1), stacked on the output channels.
    """
    w = weight
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2), torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
    kernels = []
    for r in rows:
        kernels.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))
        kernels.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))
    return torch.cat(kernels, 0)


def up2_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(nearest_up2(x))`` for a 3×3, stride-1, padding-1 ``conv``, without building the upsampled map.

    The same function (exact in real arithmetic; float rounding differs): one 2×2 convolution of
    the low-resolution input with the four phase kernels, then the phases interleaved.  It costs
    16 multiply-adds per input pixel and channel pair instead of 36 (about 1.9× fewer with the
    border) and skips the 4× upsampled tensor, forward and backward.
    """
    n, _, h, w = x.shape
    out_channels = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(4)
    y = F.conv2d(x, _phase_kernels(conv.weight), bias, padding=1).unflatten(1, (2, 2, out_channels))
    phases = [torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], -1) for a in (0, 1)]
    return torch.stack(phases, -3).reshape(n, out_channels, 2 * h, 2 * w)


class GeneratorA(nn.Module):
    """DFAD's generator (spec §2.2).

    Linear(nz → 2ngf·(s/4)²) → reshape → BN; ×2 → Conv3×3(2ngf→2ngf) → BN → LeakyReLU(0.2);
    ×2 → Conv3×3(2ngf→ngf) → BN → LeakyReLU(0.2); Conv3×3(ngf→nc) → tanh → BN(nc, affine=False).
    Variants: ``bn_eps_hidden = 0.8`` (DAFL), ``final_tanh = False`` (ZSKT), ``pixel_output = True``
    (CMI, spec §4.6: Conv3×3 → sigmoid, an image in [0, 1] pixel space instead of tanh → BN).
    ``fused_upsample``: compute each ×2 → Conv3×3 with :func:`up2_conv3x3` (same function and
    parameters, about half the work; off by default).
    """

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 1, size: int = 32,
                 bn_eps_hidden: float = 1e-5, final_tanh: bool = True, fused_upsample: bool = False,
                 pixel_output: bool = False) -> None:
        super().__init__()
        self.nz = nz
        self.init_size = size // 4
        self.fc = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.conv1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(2 * ngf, eps=bn_eps_hidden)
        self.conv2 = nn.Conv2d(2 * ngf, ngf, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(ngf, eps=bn_eps_hidden)
        self.conv3 = nn.Conv2d(ngf, nc, 3, 1, 1)
        self.final_tanh = final_tanh
        self.bn_out = nn.BatchNorm2d(nc, affine=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.fused_upsample = fused_upsample
        self.pixel_output = pixel_output

    def forward(self, z: Tensor) -> Tensor:
        x = self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.bn0(x)
        if self.fused_upsample:
            x = self.act(self.bn1(up2_conv3x3(x, self.conv1)))
            x = self.act(self.bn2(up2_conv3x3(x, self.conv2)))
        else:
            x = self.act(self.bn1(self.conv1(self.up(x))))
            x = self.act(self.bn2(self.conv2(self.up(x))))
        x = self.conv3(x)
        if self.pixel_output:
            return torch.sigmoid(x)
        if self.final_tanh:
            x = x.tanh()
        return self.bn_out(x)


class ConditionalBatchNorm2d(nn.Module):
    """CCBN(y): BN without affine, then γ_y ⊙ x̂ + β_y, γ = Emb_γ(y) (init 1), β = Emb_β(y) (init 0) (spec §2.3)."""

    def __init__(self, channels: int, num_classes: int, eps: float = 1e-3, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.gamma(y)[:, :, None, None] * self.bn(x) + self.beta(y)[:, :, None, None]


class GeneratorD(nn.Module):
    """Class-conditional GeneratorA (spec §2.3): every BN, the first and the final included, is CCBN(y)."""

    def __init__(self, num_classes: int, nz: int = 100, ngf: int = 64, nc: int = 1, size: int = 32) -> None:
        super().__init__()
        self.nz = nz
        self.num_classes = num_classes
        self.init_size = size // 4
        self.fc = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.bn0 = ConditionalBatchNorm2d(2 * ngf, num_classes)
        self.conv1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1)
        self.bn1 = ConditionalBatchNorm2d(2 * ngf, num_classes)
        self.conv2 = nn.Conv2d(2 * ngf, ngf, 3, 1, 1)
        self.bn2 = ConditionalBatchNorm2d(ngf, num_classes)
        self.conv3 = nn.Conv2d(ngf, nc, 3, 1, 1)
        self.bn_out = ConditionalBatchNorm2d(nc, num_classes)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        x = self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size)
        x = self.bn0(x, y)
        x = self.act(self.bn1(self.conv1(self.up(x)), y))
        x = self.act(self.bn2(self.conv2(self.up(x)), y))
        return self.bn_out(self.conv3(x).tanh(), y)
