"""Attention transfer on feature maps (spec §2.8; used by ZSKT and CGDD).

a(F) = L2-normalize(flatten(channel-mean of F²)); AT(F_S, F_T) = mean over batch and positions of
(a(F_S) − a(F_T))².  Pairs are the last stage at each spatial resolution that teacher and student
share; if none is shared, the last stages per resolution are paired in order and the larger map
is average-pooled to the smaller size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_map(fmap: Tensor) -> Tensor:
    """a(F): channel-mean of F², flattened per image and L2-normalized (fp32)."""
    return F.normalize(fmap.float().pow(2).mean(1).flatten(1), dim=1)


def _match_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two maps to the other's spatial size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-1] > b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def at_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """AT for one pair: mean over batch and positions of (a(F_S) − a(F_T))² (spec §2.8)."""
    s, t = _match_size(student_map, teacher_map)
    return (attention_map(s) - attention_map(t)).pow(2).mean()


def last_per_resolution(stages: Sequence[Tensor]) -> dict[int, Tensor]:
    """The last stage output at each spatial size (keyed by width), in network order."""
    out: dict[int, Tensor] = {}
    for stage in stages:
        out[stage.shape[-1]] = stage  # later stages at the same size overwrite earlier ones
    return out


def at_pairs(student_stages: Sequence[Tensor], teacher_stages: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(student, teacher) map pairs per spec §2.8: shared resolutions, else in order with pooling."""
    s = last_per_resolution(student_stages)
    t = last_per_resolution(teacher_stages)
    shared = [size for size in s if size in t]
    if shared:
        return [(s[size], t[size]) for size in shared]
    return list(zip(s.values(), t.values(), strict=False))


def at_pairs_loss(student_stages: Sequence[Tensor], teacher_stages: Sequence[Tensor]) -> Tensor:
    """Σ over pairs of AT (spec §2.8; ZSKT's and CGDD's feature-map transfer)."""
    pairs = at_pairs(student_stages, teacher_stages)
    if not pairs:
        raise ValueError("attention transfer needs at least one stage from both networks")
    return torch.stack([at_loss(a, b) for a, b in pairs]).sum()
