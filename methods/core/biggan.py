"""BigGAN-32 conditional generator and spectral-norm discriminator for HiDFD (spec §2.4).

Width = 4·ch (ch 64 in the paper: width 256; ch 16 and ch 8 for CPU profiles).  Spectral norm on
every conv and linear layer (one power iteration per training forward, eps 1e-8); weights and
embeddings initialised N(0, 0.02).  The generator ends in tanh followed by the fixed map
A(u) = ((u + 1)/2 − μ_T)/σ_T, so it emits tensors in the teacher's normalized space (spec §1.3).
The discriminator has three heads on h = Σ_spatial ReLU(features): ``adv`` (real/fake),
``adc`` (2C classes: real c = 2c, generated c = 2c + 1) and ``fi`` (feature integration, a
prediction of the teacher's feature vector f_T).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

SN_EPS = 1e-8
INIT_STD = 0.02


def sn(module: nn.Module) -> nn.Module:
    """N(0, 0.02) weight init, then spectral norm (1 power iteration per training forward, eps 1e-8)."""
    nn.init.normal_(module.weight, 0.0, INIT_STD)
    return spectral_norm(module, n_power_iterations=1, eps=SN_EPS)


def sn_conv(cin: int, cout: int, kernel: int) -> nn.Module:
    return sn(nn.Conv2d(cin, cout, kernel, padding=kernel // 2))


def sn_linear(cin: int, cout: int) -> nn.Module:
    return sn(nn.Linear(cin, cout))


class CCBN(nn.Module):
    """BigGAN's class-conditional BN: BN without affine (eps 1e-5), then (1 + E_g(y)) ⊙ x̂ + E_b(y)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.gain.weight, 0.0, INIT_STD)
        nn.init.normal_(self.bias.weight, 0.0, INIT_STD)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (1 + self.gain(y))[:, :, None, None] * self.bn(x) + self.bias(y)[:, :, None, None]


class GBlock(nn.Module):
    """ReLU(ccbn₁) → ×2 nearest → SNConv3×3 → ReLU(ccbn₂) → SNConv3×3, plus SNConv1×1(up(x))."""

    def __init__(self, cin: int, cout: int, num_classes: int) -> None:
        super().__init__()
        self.bn1 = CCBN(cin, num_classes)
        self.conv1 = sn_conv(cin, cout, 3)
        self.bn2 = CCBN(cout, num_classes)
        self.conv2 = sn_conv(cout, cout, 3)
        self.shortcut = sn_conv(cin, cout, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class BigGANGenerator(nn.Module):
    """G(z ∈ R^nz, y) → normalized image (spec §2.4): SNLinear → 4×4, three GBlocks to 32×32, BN-ReLU-SNConv-tanh-A."""

    def __init__(self, num_classes: int, nc: int, mean: tuple[float, ...], std: tuple[float, ...],
                 ch: int = 64, nz: int = 128, bottom: int = 4, blocks: int = 3) -> None:
        super().__init__()
        width = 4 * ch
        self.nz = nz
        self.num_classes = num_classes
        self.width = width
        self.bottom = bottom
        self.size = bottom * 2**blocks
        self.linear = sn_linear(nz, width * bottom * bottom)
        self.blocks = nn.ModuleList([GBlock(width, width, num_classes) for _ in range(blocks)])
        self.out_bn = nn.BatchNorm2d(width)
        self.out_conv = sn_conv(width, nc, 3)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def tanh_output(self, z: Tensor, y: Tensor) -> Tensor:
        """u ∈ [−1, 1] before the map A."""
        h = self.linear(z).view(z.shape[0], self.width, self.bottom, self.bottom)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))

    def pixels(self, z: Tensor, y: Tensor) -> Tensor:
        """Pixel-space images (u + 1)/2 ∈ [0, 1] (what stage 2 stores, spec §3.2)."""
        return (self.tanh_output(z, y) + 1) / 2

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """A(u) = ((u + 1)/2 − μ_T)/σ_T: the teacher's normalized space (spec §1.3 rule 2)."""
        return (self.pixels(z, y) - self.mean) / self.std


class DBlock(nn.Module):
    """[ReLU if pre-activated] → SNConv3×3 → ReLU → SNConv3×3 → [avg-pool 2], plus the block's shortcut."""

    def __init__(self, cin: int, cout: int, preactivation: bool, downsample: bool) -> None:
        super().__init__()
        self.preactivation = preactivation
        self.downsample = downsample
        self.conv1 = sn_conv(cin, cout, 3)
        self.conv2 = sn_conv(cout, cout, 3)
        learnable = cin != cout or downsample
        self.shortcut = sn_conv(cin, cout, 1) if learnable else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:
            if self.preactivation:  # SNConv1×1, then avg-pool
                s = self.shortcut(s)
                s = F.avg_pool2d(s, 2) if self.downsample else s
            else:  # avg-pool, then SNConv1×1
                s = F.avg_pool2d(s, 2) if self.downsample else s
                s = self.shortcut(s)
        return h + s


@dataclass
class DOutput:
    """The discriminator's three heads and the pooled feature h."""

    adv: Tensor  # (B,) real/fake score
    adc: Tensor  # (B, 2C) logits: real class c at 2c, generated class c at 2c + 1
    fi: Tensor  # (B, d_T) prediction of the teacher's feature vector
    h: Tensor  # (B, width)


class BigGANDiscriminator(nn.Module):
    """D(x) (spec §2.4): four DBlocks (32→16→8→8→8), h = Σ_spatial ReLU, SNLinear heads adv, adc, fi."""

    def __init__(self, num_classes: int, nc: int, feature_dim: int, ch: int = 64, fi_hidden: int = 1024) -> None:
        super().__init__()
        width = 4 * ch
        self.blocks = nn.Sequential(
            DBlock(nc, width, preactivation=False, downsample=True),
            DBlock(width, width, preactivation=True, downsample=True),
            DBlock(width, width, preactivation=True, downsample=False),
            DBlock(width, width, preactivation=True, downsample=False),
        )
        self.adv = sn_linear(width, 1)
        self.adc = sn_linear(width, 2 * num_classes)
        # 256 → 1024 → d_T with no nonlinearity between (spec §2.4)
        self.fi = nn.Sequential(sn_linear(width, fi_hidden), sn_linear(fi_hidden, feature_dim))

    def forward(self, x: Tensor) -> DOutput:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return DOutput(self.adv(h).squeeze(1), self.adc(h), self.fi(h), h)


# ----------------------------------------------------------------------------- EMA of G
def _is_sn_vector(name: str) -> bool:
    return ".parametrizations." in f".{name}" and (name.endswith("._u") or name.endswith("._v"))


class EmaGenerator:
    """G_ema (spec §3.2 (4)): EMA of G's parameters and BN buffers, a plain copy until ``start``.

    The spectral-norm power-iteration vectors are not averaged (an average of unit vectors is no
    singular vector); :meth:`refresh` re-estimates them for G_ema's own weights before sampling.

    Why not ``torch.optim.swa_utils.AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(decay))``:
    with ``use_buffers=True`` it averages *every* buffer, the SN vectors ``_u``/``_v`` included, and
    blends the integer ``num_batches_tracked`` in float; with ``use_buffers=False`` it copies the BN
    statistics instead of averaging them (the spec averages them); and its EMA has no plain-copy
    phase until ``start`` (it copies once, at the first update).  Matching the spec would take a
    custom ``multi_avg_fn`` over a filtered buffer list, i.e. this class again.
    ``tests/test_hidfd.py`` checks both the behaviour and the library's difference.
    """

    def __init__(self, generator: nn.Module, decay: float, start: int) -> None:
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay = decay
        self.start = start

    @torch.no_grad()
    def update(self, generator: nn.Module, iteration: int) -> None:
        keep = 0.0 if iteration <= self.start else self.decay
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in generator.parameters()]
        for p_ema, p in zip(ema_params, params, strict=True):
            p_ema.lerp_(p, 1.0 - keep)
        source = dict(generator.named_buffers())
        for name, buf in self.model.named_buffers():
            if _is_sn_vector(name) or name not in source:
                continue
            if buf.dtype.is_floating_point:
                buf.lerp_(source[name], 1.0 - keep)
            else:
                buf.copy_(source[name])

    @torch.no_grad()
    def refresh(self, generator: nn.Module, power_iterations: int = 20) -> None:
        """Warm-start G_ema's SN vectors from G's and run power iterations on G_ema's weights."""
        refresh_spectral_norm(self.model, power_iterations, source=generator)


@torch.no_grad()
def refresh_spectral_norm(model: nn.Module, power_iterations: int, source: nn.Module | None = None) -> None:
    """Run ``power_iterations`` power iterations on every spectral-normed weight of ``model``.

    With ``source`` (same architecture), its vectors u, v are copied first as a warm start.
    Only the SN parametrizations are switched to training mode; BN modes stay as they are.
    """
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buf in model.named_buffers():
        if _is_sn_vector(name) and name in source_buffers:
            buf.copy_(source_buffers[name])
    for module in model.modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None or "weight" not in plist:
            continue
        for param in plist["weight"]:
            if hasattr(param, "_u"):
                was = param.training
                param.train()
                for _ in range(power_iterations):
                    module.weight  # noqa: B018  (accessing the weight runs one power iteration)
                param.train(was)
