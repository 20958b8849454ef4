"""Model inversion with a synthetic pool: the epoch structure DeepInversion, ADI (spec §4.4) and CMI (§4.6) share.

One **iteration** of these methods is one epoch (spec §1.2): a synthesis round that inverts the
teacher into ``b_syn`` new images, which join the pool, then ``kd_steps`` KD steps on minibatches
drawn from the *whole* pool::

    for epoch in 1..iterations:
        pixels = synthesize()            # the method's round; its lowest-loss iterate, in [0, 1]
        pool.add(pixels)                 # uint8, preallocated on the device, write index
        for _ in range(kd_steps):        # τ²·KL_τ(T‖S), τ = 20, on RandomCrop(32, 4) + flip of the pool
            ...
        lr_schedule.step()               # ×0.1 at the milestones (fractions of the epochs)

Storage follows spec §1.3 rule 3: images are kept in pixel space as uint8 (no PNG files, no
DataLoader), and read back through the real-image pipeline (:class:`~methods.core.images.ImageSet`:
uint8 → [0, 1] → augmentation → Normalize(μ_T, σ_T)).  Flips follow the dataset's convention
(``ctx.train_augment.flip``): on for CIFAR, never on MNIST (spec §2.9), in the KD crops and in
the synthesis jitter alike.

Each run records ``synthetic_images``, ``synthesis_seconds`` and ``kd_seconds`` (wall time per
stage, with one CUDA synchronisation per stage boundary, never per step) and the rates
``synthesis_images_per_second`` (pool images per synthesis second) and ``kd_steps_per_second``.
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import make_grid

from .checkpoint import Tally
from .conditional import frozen_parameters
from .context import DistillContext
from .images import Augment, ImageSet
from .losses import kd_loss
from .method import CollectedUse, CommonHparams, Method, hp
from .schedules import Schedule, scheduler, sgd

# The default teacher -> student pairs on MNIST-like data: the BN-statistics losses need the
# LeNet-5-BN teacher (spec §2.1, §4: DeepInversion and CMI run only in the lenet5_bn setting).
BN_PAIRS = {"mnist": ("lenet5-bn", "lenet5-half"), "fashion-mnist": ("lenet5-bn", "lenet5-half")}


# ----------------------------------------------------------------------------- device buffers
class RingBuffer:
    """A preallocated (capacity, *shape) tensor on one device with a write index, wrapping at capacity.

    ``add`` writes after the last write and overwrites the oldest entries once full; ``count`` (a
    Python int, so reading it costs no host sync) is how many entries hold data.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        if capacity <= 0:
            raise ValueError("a ring buffer needs a positive capacity")
        self.data = torch.zeros((capacity, *shape), dtype=dtype, device=device)
        self.capacity = capacity
        self.index = 0  # next write position
        self.count = 0
        self.writes = 0  # entries written in total

    def add(self, items: Tensor) -> None:
        """Append ``items`` (n, *shape); with n > capacity only the last ``capacity`` are kept."""
        items = items.detach()
        n = items.shape[0]
        self.writes += n
        if n >= self.capacity:
            self.data.copy_(items[n - self.capacity:])
            self.index, self.count = 0, self.capacity
            return
        end = self.index + n
        if end <= self.capacity:
            self.data[self.index:end] = items
        else:
            first = self.capacity - self.index
            self.data[self.index:] = items[:first]
            self.data[: n - first] = items[first:]
        self.index = end % self.capacity
        self.count = min(self.capacity, self.count + n)

    def state_dict(self) -> dict[str, object]:
        """The entries holding data and the write index (a checkpoint stores only the filled part)."""
        return {"data": self.data[: self.count], "index": self.index, "count": self.count, "writes": self.writes}

    def load_state_dict(self, state: dict[str, object]) -> None:
        data: Tensor = state["data"]  # type: ignore[assignment]
        if data.shape[1:] != self.data.shape[1:] or data.shape[0] > self.capacity:
            raise ValueError(f"saved buffer {tuple(data.shape)} does not fit {tuple(self.data.shape)}")
        self.data[: data.shape[0]].copy_(data)
        self.index, self.count, self.writes = int(state["index"]), int(state["count"]), int(state["writes"])  # type: ignore[call-overload]

    def filled(self) -> Tensor:
        """The entries holding data (a view, no copy)."""
        return self.data[: self.count]

    def sample(self, k: int) -> Tensor:
        """``min(k, count)`` distinct entries drawn uniformly (indices drawn on the device)."""
        index = torch.randperm(self.count, device=self.data.device)[:k]
        return self.data[index]


class PixelPool(RingBuffer):
    """Synthetic images in pixel space, stored as uint8 (spec §1.3 rule 3), read back as an :class:`ImageSet`."""

    def __init__(self, capacity: int, channels: int, size: int, device: torch.device) -> None:
        super().__init__(capacity, (channels, size, size), torch.uint8, device)

    def add_pixels(self, pixels: Tensor) -> None:
        """Quantize images in [0, 1] to uint8 (never min–max stretched) and append them."""
        self.add(pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8))

    def image_set(self, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageSet:
        """The stored images (a view) as an unlabelled ImageSet with the teacher's normalization."""
        return ImageSet(self.filled(), None, self.data.shape[-1], mean, std)


# ----------------------------------------------------------------------------- losses and priors
def total_variation(x: Tensor) -> Tensor:
    """TV = Σ of the Frobenius norms (over the whole batch) of the horizontal, vertical and both diagonal
    neighbour differences (spec §4.4; DeepInversion's ``loss_var_l2``)."""
    x = x.float()
    horizontal = x[:, :, :, :-1] - x[:, :, :, 1:]
    vertical = x[:, :, :-1, :] - x[:, :, 1:, :]
    diagonal = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    anti_diagonal = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (horizontal, vertical, diagonal, anti_diagonal))  # type: ignore[return-value]


def js_divergence(teacher_logits: Tensor, student_logits: Tensor, tau: float = 3.0) -> Tensor:
    """JS_τ(p_T, p_S) = ½·KL(p_T‖m) + ½·KL(p_S‖m), m = ½(p_T + p_S), p = softmax(z/τ); batch mean, fp32 (spec §4.4).

    The standard Jensen–Shannon divergence (in nats, at most log 2).  The released code computes
    ½·KL(m‖p_T) + ½·KL(m‖p_S) on probabilities clamped to [0.01, 1]; the spec names JS, which this is.
    """
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=1)
    log_q = F.log_softmax(student_logits.float() / tau, dim=1)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def roll_flip(x: Tensor, max_shift: int, flip: bool) -> Tensor:
    """DeepInversion's jitter (spec §4.4): one random roll of the batch by up to ``max_shift`` pixels in each
    direction and, when ``flip``, a horizontal flip of the batch with probability ½.

    The offsets come from Python's ``random`` (seeded by the harness), so the jitter costs no host sync.
    """
    dy, dx = random.randint(-max_shift, max_shift), random.randint(-max_shift, max_shift)
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and random.random() < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


class LowestLoss:
    """The lowest-loss iterate of a synthesis round, kept on the device with ``torch.where`` (no host sync).

    ``offer(loss, *tensors)`` keeps ``tensors`` (detached copies) when ``loss`` is strictly below the
    best so far; the first offer is always kept.  ``best`` holds the kept tensors, ``loss`` their loss.
    """

    def __init__(self) -> None:
        self.loss: Tensor | None = None
        self.best: tuple[Tensor, ...] = ()

    def offer(self, loss: Tensor, *tensors: Tensor) -> None:
        loss = loss.detach().float()
        if self.loss is None:
            self.loss = loss.clone()
            self.best = tuple(t.detach().clone() for t in tensors)
            return
        better = loss < self.loss
        self.best = tuple(torch.where(better, t.detach(), b) for t, b in zip(tensors, self.best, strict=True))
        self.loss = torch.where(better, loss, self.loss)


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class InversionHparams(CommonHparams):
    """The KD side shared by DI, ADI and CMI (spec §4.4 "KD"), with DeepInversion's defaults.

    ``iterations`` counts epochs (one synthesis round of ``b_syn`` images + ``kd_steps`` KD steps,
    spec §1.2); ``eval_every`` is in epochs (default 1, one recipe epoch, spec §1.5); ``batch_size`` is the KD batch.  ``milestones`` are
    fractions of the epochs (120/150/180 of 200); ``warmup`` epochs of linear KD lr warm-up precede them (0, the
    spec's schedule, in every profile; a knob to tune).  ``kd_crop_padding``: RandomCrop(size, padding)
    of the pool images in the KD steps (flip per the dataset's convention).  ``student_eval_in_synthesis``:
    the released code puts S in eval() during synthesis; by default S stays in train() with its
    parameters frozen (spec §1.6).  ``samples``: images of the pool in the sample grid.
    """

    iterations: int = hp(200, ge=1)
    batch_size: int = hp(256, ge=1)
    eval_every: int = hp(1, ge=1)
    b_syn: int = hp(256, ge=1)
    g_steps: int = hp(2000, ge=1)
    kd_steps: int = hp(400, ge=1)
    kd_tau: float = hp(20.0, gt=0)
    lr_s: float = hp(0.1, gt=0)
    momentum: float = hp(0.9, ge=0, lt=1)
    weight_decay: float = hp(1e-4, ge=0)
    schedule: Schedule = "multistep"
    milestones: tuple[float, ...] = hp((0.6, 0.75, 0.9), gt=0, lt=1)
    gamma: float = hp(0.1, gt=0)
    warmup: int = hp(0, ge=0)  # epochs of linear KD lr warm-up before the schedule (0: none, the spec's)
    kd_crop_padding: int = hp(4, ge=0)
    student_eval_in_synthesis: bool = False
    samples: int = hp(64, ge=1)


# ----------------------------------------------------------------------------- the shared method
def stage_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the queued device work is done (one CUDA sync; none on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def kd_step(teacher: nn.Module, student: nn.Module, opt: torch.optim.Optimizer, x: Tensor, tau: float) -> Tensor:
    """One student step on τ²·KL_τ(sg T‖S) (spec §4.4); returns the loss (detached, on the device)."""
    with torch.no_grad():
        t_logits = teacher(x)
    loss = kd_loss(t_logits, student(x), tau)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def kd_epoch(ctx: DistillContext, pool: PixelPool, opt: torch.optim.Optimizer, steps: int, batch: int,
             augment: Augment, tau: float) -> Tensor:
    """``steps`` KD steps on minibatches that cover the whole pool (reshuffled when used up); the mean loss."""
    images = pool.image_set(ctx.mean, ctx.std)
    sampler = images.sampler(min(batch, len(images)))
    total = torch.zeros((), device=ctx.device)
    for _ in range(steps):
        x = images.batch(sampler.next(), augment)
        with ctx.autocast():
            total += kd_step(ctx.teacher, ctx.student, opt, x, tau)
    return total / steps


@torch.no_grad()
def pool_grid(pool: PixelPool, n: int) -> Tensor:
    """A uint8 (3, H, W) grid of ``n`` pool images drawn uniformly (pixel space, as stored)."""
    pixels = pool.sample(n).float().div(255)
    return make_grid(pixels.cpu(), nrow=8, padding=2).mul(255).round().to(torch.uint8)


class InversionMethod(Method):
    """Base of the inversion methods: the epoch loop of spec §4.4 "KD"; subclasses implement one round.

    ``setup(ctx)`` builds (and ``ctx.track``s and ``ctx.keep``s) the synthesis networks once; ``synthesize(ctx)``
    runs one round and returns the round's images in [0, 1] (detached) and its losses (device
    tensors, for the metrics).
    """

    Hparams = InversionHparams
    collected_use = CollectedUse.NONE
    needs_teacher_bn = True
    default_pairs = BN_PAIRS

    def setup(self, ctx: DistillContext) -> None:
        raise NotImplementedError

    def synthesize(self, ctx: DistillContext) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def run(self, ctx: DistillContext) -> None:
        hp_: InversionHparams = self.hp  # type: ignore[assignment]
        student = ctx.student.train()
        ctx.watch(student)
        self.setup(ctx)
        pool = PixelPool(ctx.iterations * hp_.b_syn, ctx.channels, ctx.size, ctx.device)
        opt = sgd(student.parameters(), hp_.lr_s, hp_.momentum, hp_.weight_decay)
        schedule = scheduler(opt, hp_.schedule, ctx.iterations, hp_.milestones, hp_.gamma, hp_.warmup)
        augment = Augment(crop_padding=hp_.kd_crop_padding, flip=ctx.train_augment.flip)
        seconds = Tally(synthesis=0.0, kd=0.0)
        ctx.keep(pool=pool, opt_student=opt, sched_student=schedule, seconds=seconds)

        for epoch in ctx.steps(ctx.iterations):
            start = stage_clock(ctx.device)
            pixels, losses = self.synthesize(ctx)
            pool.add_pixels(pixels)
            middle = stage_clock(ctx.device)
            student.train()
            losses["kd"] = kd_epoch(ctx, pool, opt, hp_.kd_steps, hp_.batch_size, augment, hp_.kd_tau)
            end = stage_clock(ctx.device)
            seconds["synthesis"] += middle - start
            seconds["kd"] += end - middle
            schedule.step()
            ctx.end_iteration(epoch, losses)

        synthesis_seconds, kd_seconds = seconds["synthesis"], seconds["kd"]
        totals = {
            "synthetic_images": float(pool.writes),
            "synthesis_seconds": synthesis_seconds,
            "kd_seconds": kd_seconds,
            "synthesis_images_per_second": pool.writes / max(synthesis_seconds, 1e-9),
            "kd_steps_per_second": ctx.iterations * hp_.kd_steps / max(kd_seconds, 1e-9),
        }
        for key, value in totals.items():
            ctx.record(key, value)
        ctx.log_metrics(ctx.iterations, totals)
        ctx.add_artifact("samples", pool_grid(pool, hp_.samples))


@contextlib.contextmanager
def synthesis_student(ctx: DistillContext, eval_mode: bool = False) -> Iterator[nn.Module]:
    """The student as a synthesis round sees it (spec §1.6): in ``train()`` (``eval()`` with the
    released code's flag), its parameters frozen so that only the input receives gradients; back in
    ``train()`` with its gradients re-enabled afterwards."""
    student = ctx.student
    student.train(not eval_mode)
    try:
        with frozen_parameters(student):
            yield student
    finally:
        student.train()
