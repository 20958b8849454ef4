"""Model zoo by name (spec §2.1): classifiers that expose logits, vec, map and stages.

Every network implements ``features(x) -> Features`` in one pass, ``forward(x) -> logits``,
``head`` (vec → logits) and ``bn_layers()``.  Names: lenet5, lenet5-half, lenet5-bn, resnet18,
resnet34 (CIFAR "8x" variants: 3×3 stem, no max-pool), wrn-16-1, wrn-16-2, wrn-40-1, wrn-40-2,
vgg11-bn.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.core.errors import DfkdError


@dataclass
class Features:
    """One forward pass: logits, vec (head input), map (before pooling), stages (for AT)."""

    logits: Tensor
    vec: Tensor
    map: Tensor
    stages: list[Tensor]


class ZooNet(nn.Module):
    """Base: subclasses implement ``body(x) -> (map, stages)``, ``pool(map) -> vec`` and ``head``."""

    head: nn.Module

    def body(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def pool(self, fmap: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(fmap, 1).flatten(1)

    def features(self, x: Tensor) -> Features:
        fmap, stages = self.body(x)
        vec = self.pool(fmap)
        return Features(self.head(vec), vec, fmap, stages)

    def forward(self, x: Tensor) -> Tensor:
        fmap, _ = self.body(x)
        return self.head(self.pool(fmap))

    def bn_layers(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]


# ----------------------------------------------------------------------------- LeNet-5
class LeNet5(ZooNet):
    """LeNet-5 for 32×32 inputs (spec §2.1): conv5 c1, pool, conv5 c2, pool, conv5 c3, fc, fc.

    ``width`` scales every layer (0.5 → LeNet-5-half: 3/8/60, fc 42).  ``batch_norm`` adds BN
    before each conv ReLU (the ``lenet5-bn`` teacher for BN-statistics methods, spec §2.1).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, batch_norm: bool = False):
        super().__init__()
        c1, c2, c3, f1 = (max(1, round(c * width)) for c in (6, 16, 120, 84))

        def block(cin: int, cout: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.conv1 = block(in_channels, c1)
        self.conv2 = block(c1, c2)
        self.conv3 = block(c2, c3)
        self.head = nn.Sequential(nn.Linear(c3, f1), nn.ReLU(inplace=True), nn.Linear(f1, num_classes))

    def body(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        s1 = self.conv1(x)
        s2 = self.conv2(F.max_pool2d(s1, 2))
        fmap = self.conv3(F.max_pool2d(s2, 2))
        return fmap, [s1, s2]

    def pool(self, fmap: Tensor) -> Tensor:
        return fmap.flatten(1)


# ----------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(ZooNet):
    """CIFAR ResNet (spec §2.1): 3×3 stem, no max-pool, stages 64/128/256/512, strides 1/2/2/2."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers = []
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, width, stride if j == 0 else 1))
                cin = width
            layers.append(nn.Sequential(*stage))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(512, num_classes)

    def body(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.stem(x)
        stages = []
        for layer in self.layers:
            out = layer(out)
            stages.append(out)
        return out, stages


# ----------------------------------------------------------------------------- WRN
class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3(s)-BN-ReLU-conv3×3; 1×1 shortcut on the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class WideResNet(ZooNet):
    """WRN-d-k (spec §2.1): groups of (d−4)/6 pre-act blocks, widths 16k/32k/64k, strides 1/2/2."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups = []
        cin = 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, width, stride if j == 0 else 1))
                cin = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def body(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.stem(x)
        stages = []
        for group in self.groups:
            out = group(out)
            stages.append(out)
        return F.relu(self.bn(out)), stages


# ----------------------------------------------------------------------------- VGG
class VGG11BN(ZooNet):
    """VGG-11-BN for CIFAR (spec §2.1): stages [64],[128],[256,256],[512,512],[512,512]; GAP; Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        cfg = ((64,), (128,), (256, 256), (512, 512), (512, 512))
        stages = []
        cin = in_channels
        for widths in cfg:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(512, num_classes)

    def body(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = x
        outs = []
        for i, stage in enumerate(self.stages):
            out = stage(out)
            outs.append(out)
            if i < 4:
                out = F.max_pool2d(out, 2)
        return out, outs


# ----------------------------------------------------------------------------- registry
ARCHS: dict[str, Callable[[int, int], ZooNet]] = {
    "lenet5": lambda c, ch: LeNet5(c, ch),
    "lenet5-half": lambda c, ch: LeNet5(c, ch, width=0.5),
    "lenet5-bn": lambda c, ch: LeNet5(c, ch, batch_norm=True),
    "resnet18": lambda c, ch: ResNetCifar((2, 2, 2, 2), c, ch),
    "resnet34": lambda c, ch: ResNetCifar((3, 4, 6, 3), c, ch),
    "wrn-16-1": lambda c, ch: WideResNet(16, 1, c, ch),
    "wrn-16-2": lambda c, ch: WideResNet(16, 2, c, ch),
    "wrn-40-1": lambda c, ch: WideResNet(40, 1, c, ch),
    "wrn-40-2": lambda c, ch: WideResNet(40, 2, c, ch),
    "vgg11-bn": lambda c, ch: VGG11BN(c, ch),
}


def arch_names() -> list[str]:
    return list(ARCHS)


def check_arch(arch: str) -> None:
    """A one-line error naming ``arch`` and the allowed names when it is not in the zoo."""
    if arch not in ARCHS:
        raise DfkdError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")


def build(arch: str, num_classes: int, in_channels: int) -> ZooNet:
    """A fresh network ``arch`` for ``num_classes`` classes and ``in_channels`` input channels."""
    check_arch(arch)
    return ARCHS[arch](num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def feature_shapes(model: ZooNet, in_channels: int, size: int = 32) -> dict[str, object]:
    """Shapes of vec, map and stages for one input (documentation and tests)."""
    was = model.training
    model.eval()
    f = model.features(torch.zeros(1, in_channels, size, size))
    model.train(was)
    return {"vec": tuple(f.vec.shape[1:]), "map": tuple(f.map.shape[1:]), "stages": [tuple(s.shape[1:]) for s in f.stages]}
