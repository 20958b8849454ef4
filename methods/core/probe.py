"""What the teacher was last shown in training, scored at each evaluation (a diagnostic, not a loss).

A data-free method can fail while its losses look healthy: DFAD's generator on a BN teacher stays in
the few classes the teacher assigns to noise, the student matches the teacher there and still scores
near chance on real digits (README, "Why DFAD fails with the BN teacher").  These numbers make that
visible for every run in the tracking UI, computed from the last batch the teacher saw in the step
loop (a generator's or pixel optimiser's images, a synthetic pool's batch, collected or real data):

- ``probe/class_coverage``: entropy of the histogram of teacher argmax classes over the batch,
  divided by log C — 1 when every class is equally frequent, 0 when all samples fall in one class
  (DAFL's information-entropy idea, spec §4.3, measured on the argmax instead of p̄);
- ``probe/teacher_confidence``: mean over the batch of max_c p_T;
- ``probe/agreement``: fraction of the batch where the predictor's argmax equals the teacher's —
  read it next to ``val_accuracy``: high agreement with low validation accuracy means the student
  learned the teacher only where the synthetic data lie;
- ``probe/teacher_logit_abs``: mean |z_T| (a BN teacher's off-data gain shows here).

One more number is scored on held-out real images (the harness's first ``REAL_PROBE_SAMPLES`` validation
images; the method never sees them):

- ``probe/silent_units``: fraction of the student's units that never fire on those images — channels of
  its stage outputs (post-ReLU in LeNet, ResNet and VGG) and units of its penultimate vector whose output
  is ≤ 0 at every image and position.  A tiny student that lost a layer's channels to synthetic data
  shows it here (CMI's quick runs under 93% at lr 0.01: 5 of LeNet-5-half's 8 conv2 channels, README).

Only references are kept in the loop (no copy, no host sync); the scoring runs at evaluation, on at
most ``PROBE_SAMPLES`` images, in eval mode and without autograd; it draws no random numbers.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .modes import eval_mode

PROBE_SAMPLES = 256
REAL_PROBE_SAMPLES = 512


def class_coverage(labels: Tensor, num_classes: int) -> Tensor:
    """Entropy of the class histogram of ``labels`` divided by log C (in [0, 1]; 0 for C = 1)."""
    counts = torch.zeros(num_classes, device=labels.device).index_add_(
        0, labels, torch.ones(labels.shape[0], device=labels.device))
    freq = counts / counts.sum().clamp_min(1.0)
    entropy = -(freq * freq.clamp_min(1e-12).log()).sum()
    return entropy / math.log(num_classes) if num_classes > 1 else torch.zeros(())


@torch.no_grad()
def score_batch(teacher: nn.Module, predictor: nn.Module, x: Tensor, num_classes: int) -> dict[str, Tensor]:
    """The ``probe/*`` numbers for batch ``x`` (module modes are restored afterwards)."""
    x = x[:PROBE_SAMPLES].float()
    with eval_mode(teacher, predictor):
        z_t = teacher(x).float()
        z_s = predictor(x).float()
    y_t = z_t.argmax(1)
    return {
        "probe/class_coverage": class_coverage(y_t, num_classes),
        "probe/teacher_confidence": z_t.softmax(1).amax(1).mean(),
        "probe/agreement": (z_s.argmax(1) == y_t).float().mean(),
        "probe/teacher_logit_abs": z_t.abs().mean(),
    }


@torch.no_grad()
def silent_units(student: nn.Module, x: Tensor) -> Tensor:
    """``probe/silent_units``: the fraction of the units of ``student.features(x)``'s stage maps (per channel)
    and penultimate vector that are ≤ 0 on every image and position of ``x`` (eval mode, restored after)."""
    with eval_mode(student):
        f = student.features(x)
    peaks = [m.float().transpose(0, 1).flatten(1).amax(1) for m in (*f.stages, f.vec)]  # per unit: max over N (, H, W)
    return (torch.cat(peaks) <= 0).float().mean()
