"""DeepInversion (DI), in the CMI benchmark's form (spec §4.4): ADI with λ_adv = 0.

The synthesis round inverts the teacher alone (BN statistics, label CE, TV and ℓ2 priors); the
student is never forwarded while images are synthesised.  Everything else, including the pool and
KD epochs, is :mod:`methods.adi` and :mod:`methods.core.inversion`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .adi import ADI, ADIHparams
from .core.method import hp
from .core.registry import register


@dataclass
class DeepInversionHparams(ADIHparams):
    """ADI's defaults (spec §4.4, "DeepInv-2k") with λ_adv = 0."""

    lambda_adv: float = hp(0.0, ge=0)


@register("deepinv")
class DeepInversion(ADI):
    """DeepInversion: pixels inverted from the teacher's BN statistics and labels, no adversarial term (spec §4.4)."""

    Hparams = DeepInversionHparams
    search_space = {k: v for k, v in ADI.search_space.items() if k != "lambda_adv"}
