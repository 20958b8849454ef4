"""SimKD projector and the classifier-sharing predictor (spec §2.6).

P = Conv1×1(s→t/2)-BN-ReLU → Conv3×3(t/2→t/2)-BN-ReLU → Conv1×1(t/2→t)-BN-ReLU, no conv bias.
L_SimKD = MSE(P(F_S), sg F_T).  Prediction = head_T(GAP(P(F_S))) with the teacher's frozen head:
the deployed "student" is backbone + P + teacher head.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .losses import mse


def match_sizes(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of the two maps to the other's spatial size."""
    hs, ht = student_map.shape[-1], teacher_map.shape[-1]
    if hs > ht:
        student_map = F.adaptive_avg_pool2d(student_map, teacher_map.shape[-2:])
    elif ht > hs:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, student_map.shape[-2:])
    return student_map, teacher_map


class Projector(nn.Module):
    """The SimKD projector P (spec §2.6)."""

    def __init__(self, s_channels: int, t_channels: int) -> None:
        super().__init__()
        mid = max(1, t_channels // 2)
        self.net = nn.Sequential(
            nn.Conv2d(s_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, t_channels, 1, bias=False),
            nn.BatchNorm2d(t_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SharedHeadPredictor(nn.Module):
    """Student backbone + projector + the teacher's frozen classifier (spec §2.6)."""

    def __init__(self, student: nn.Module, projector: Projector, teacher_head: nn.Module, teacher_map_size: int) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.teacher_head = teacher_head
        self.teacher_map_size = teacher_map_size

    def projected(self, x: Tensor) -> Tensor:
        """P(F_S), with F_S pooled to the teacher's map size when larger.

        F_S comes from the student's ``body`` (zoo nets), so the student's own classifier, which the
        deployed predictor does not use, is neither run nor counted in its size (spec §2.1).
        """
        body = getattr(self.student, "body", None)
        fmap = body(x)[0] if body is not None else self.student.features(x).map
        if fmap.shape[-1] > self.teacher_map_size:
            fmap = F.adaptive_avg_pool2d(fmap, self.teacher_map_size)
        return self.projector(fmap)

    def forward(self, x: Tensor) -> Tensor:
        return self.teacher_head(F.adaptive_avg_pool2d(self.projected(x), 1).flatten(1))


def simkd_loss(projected: Tensor, teacher_map: Tensor) -> Tensor:
    """L_SimKD = MSE(P(F_S), sg F_T) (spec §2.6); the teacher map is pooled if larger."""
    projected, teacher_map = match_sizes(projected, teacher_map.detach())
    return mse(projected, teacher_map)
