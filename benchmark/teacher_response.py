"""How strongly a teacher answers noise, next to how it answers real images (a diagnostic, not a loss).

The generator-family methods (DFAD, DAFL, ZSKT, CGDD, CPSC) start from images near noise and learn
from the teacher's answers there.  A teacher that is as confident on N(0, 1) inputs (in its
normalized space, spec §1.3) as on real digits hands them a confident, few-class signal without
any digit in it: on MNIST our LeNet-5-BN answers noise with a mean |logit| of about 6, as high as on
real digits, while the BN-less LeNet-5 answers it with about 2 (README, "Why DFAD fails with the BN
teacher").  Recorded in each teacher's manifest when it is trained, shown by ``teachers list``:

- ``real_logit_abs``: mean |z_T| over (at most ``SAMPLES``) validation images;
- ``noise_logit_abs``: mean |z_T| over ``SAMPLES`` N(0, 1) inputs of the same shape (seeded, own RNG);
- ``noise_to_real``: their ratio (≈ 1: noise is answered as confidently as data);
- ``noise_class_coverage``: entropy of the teacher's argmax histogram on the noise, over log C
  (near 0: noise falls into a few classes, where a generator then collapses).

Validation images are the harness's (spec §1.4): no method sees them, and this selects nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.core.images import ImageSet
from methods.core.modes import eval_mode
from methods.core.probe import class_coverage

SAMPLES = 512
NOISE_SEED = 0


@torch.no_grad()
def noise_response(model: nn.Module, real: ImageSet, num_classes: int, samples: int = SAMPLES,
                   seed: int = NOISE_SEED) -> dict[str, float]:
    """Mean |z_T| on real images and on N(0, 1) noise, their ratio, and the class coverage of the noise's argmax."""
    device = next(model.parameters()).device
    x_real = real.batch(slice(0, samples)).to(device)  # normalizes only the images used
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x_noise = torch.randn((samples, *x_real.shape[1:]), generator=generator).to(device)
    with eval_mode(model):
        z_real = model(x_real).float()
        z_noise = model(x_noise).float()
    real_abs = z_real.abs().mean()
    noise_abs = z_noise.abs().mean()
    return {
        "real_logit_abs": float(real_abs),
        "noise_logit_abs": float(noise_abs),
        "noise_to_real": float(noise_abs / real_abs.clamp_min(1e-12)),
        "noise_class_coverage": float(class_coverage(z_noise.argmax(1), num_classes)),
    }
