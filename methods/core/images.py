"""Image sets held as tensors on the device, with batched (never per-sample) transforms.

Spec §1.3: every tensor entering T, S or D is in the teacher's normalized input space; real
images go ToTensor → (MNIST: resize to 32) → pixel-space augmentation → Normalize(μ_T, σ_T).
Pixels are stored as uint8 at their native size; a batch is converted, resized, augmented and
normalized on the device in a handful of tensor ops.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .modes import eval_mode


@dataclass(frozen=True)
class Augment:
    """Pixel-space augmentation applied per batch (each image independently).

    ``crop_padding``: RandomCrop(size, padding) with zero padding; ``flip``: horizontal flip with
    probability 1/2; ``resized_crop_scale``: RandomResizedCrop area range (replaces the crop).
    """

    crop_padding: int = 0
    flip: bool = False
    resized_crop_scale: tuple[float, float] | None = None

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip and self.resized_crop_scale is None


NO_AUGMENT = Augment()


@functools.lru_cache(maxsize=64)
def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(μ, σ) as (1, C, 1, 1) tensors on ``device``, made once per device and dtype (spec §1.3).

    Building them per batch with ``torch.tensor`` would be a blocking host-to-device copy on CUDA.
    The cached tensors are shared: never modify them in place.
    """
    shape = (1, -1, 1, 1)
    return (torch.tensor(mean, device=device, dtype=dtype).view(shape),
            torch.tensor(std, device=device, dtype=dtype).view(shape))


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Batched RandomCrop(size, padding): zero-pad, then take an independent offset per image."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: Tensor) -> Tensor:
    """Batched RandomHorizontalFlip(0.5)."""
    mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(mask, x.flip(-1), x)


def random_resized_crop(x: Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Batched RandomResizedCrop(size, scale, ratio) via one affine grid-sample (bilinear)."""
    b = x.shape[0]
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(*scale)
    log_ratio = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def concat(sets: list[ImageSet]) -> ImageSet:
    """One set of all images (pixel space, float16 at the network size); labels kept only if all have them."""
    first = sets[0]
    pixels = torch.cat([s.to_pixels(slice(None)).half() for s in sets])
    labels = None
    if all(s.labels is not None for s in sets):
        labels = torch.cat([s.labels for s in sets])  # type: ignore[misc]
    return ImageSet(pixels, labels, first.size, first.mean, first.std)


def apply_augment(x: Tensor, augment: Augment) -> Tensor:
    """Apply ``augment`` to a pixel-space batch in [0, 1]."""
    if augment.resized_crop_scale is not None:
        x = random_resized_crop(x, augment.resized_crop_scale)
    elif augment.crop_padding:
        x = random_crop(x, augment.crop_padding)
    if augment.flip:
        x = random_flip(x)
    return x


@dataclass
class ImageSet:
    """Images as a uint8 (or float16 in [0, 1]) tensor (N, C, H, W) plus optional labels, on one device.

    ``size`` is the side the network sees (MNIST 28 → 32, spec §2.9); ``mean``/``std`` are the
    teacher's normalization statistics (spec §1.3 rule 4).  ``labels`` is ``None`` when withheld.
    """

    pixels: Tensor
    labels: Tensor | None
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _normalized: Tensor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def channels(self) -> int:
        return self.pixels.shape[1]

    def to(self, device: torch.device | str) -> ImageSet:
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.pixels.to(device), labels, self.size, self.mean, self.std)

    def subset(self, index: Tensor, keep_labels: bool = True) -> ImageSet:
        """The images at ``index`` (labels dropped unless ``keep_labels``)."""
        index = index.to(self.pixels.device)
        labels = self.labels[index] if (keep_labels and self.labels is not None) else None
        return ImageSet(self.pixels[index], labels, self.size, self.mean, self.std)

    def without_labels(self) -> ImageSet:
        """The same images with labels withheld (what methods see of collected data, spec §1.4)."""
        return ImageSet(self.pixels, None, self.size, self.mean, self.std)

    def to_pixels(self, index: Tensor | slice) -> Tensor:
        """Float pixels in [0, 1] at the network's size, for ``index``."""
        x = self.pixels[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        """(x − μ)/σ per channel."""
        mean, std = channel_stats(tuple(self.mean), tuple(self.std), x.device, x.dtype)
        return (x - mean) / std

    def batch(self, index: Tensor | slice, augment: Augment = NO_AUGMENT) -> Tensor:
        """A normalized batch at ``index``, augmented in pixel space first."""
        x = self.to_pixels(index)
        if not augment.is_identity:
            x = apply_augment(x, augment)
        return self.normalize(x)

    def normalized(self) -> Tensor:
        """All images normalized, un-augmented; cached (used for evaluation)."""
        if self._normalized is None:
            self._normalized = self.batch(slice(None))
        return self._normalized

    def sampler(self, batch_size: int, generator: torch.Generator | None = None) -> EpochSampler:
        return EpochSampler(len(self), batch_size, self.device, generator)


class EpochSampler:
    """Endless shuffled index batches (reshuffled each epoch, on the device; drop-last-free)."""

    def __init__(self, n: int, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        if n <= 0:
            raise ValueError("cannot sample from an empty image set")
        self.n = n
        self.batch_size = batch_size
        self.device = device
        self.generator = generator
        self._perm = torch.empty(0, dtype=torch.long, device=device)
        self._pos = 0

    def state_dict(self) -> dict[str, object]:
        """The current epoch's permutation and position (a resumed run sees the same batches)."""
        state: dict[str, object] = {"perm": self._perm, "pos": self._pos}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._perm = state["perm"].to(self.device)  # type: ignore[union-attr]
        self._pos = int(state["pos"])  # type: ignore[call-overload]
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])  # type: ignore[arg-type]

    def next(self) -> Tensor:
        """The next ``batch_size`` indices; an epoch boundary is crossed seamlessly."""
        parts = []
        need = self.batch_size
        while need > 0:
            if self._pos >= self._perm.numel():
                self._perm = torch.randperm(self.n, device=self.device, generator=self.generator)
                self._pos = 0
            take = min(need, self._perm.numel() - self._pos)
            parts.append(self._perm[self._pos : self._pos + take])
            self._pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: ImageSet, batch_size: int = 1000) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode on labelled ``images``; one host sync."""
    if images.labels is None:
        raise ValueError("accuracy needs labelled images")
    data = images.normalized()
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            logits = model(data[start : start + batch_size])
            correct += (logits.argmax(1) == images.labels[start : start + batch_size]).sum()
    return correct.item() / len(images)
