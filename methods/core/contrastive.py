"""Supervised contrastive loss (SupCon, spec §2.7) and the frozen feature adapter of CPSC (spec §3.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """SupCon over L2-normalized ``features`` (N×d), each labelled by ``labels`` (N) (spec §2.7).

    For anchor i: P(i) = {p ≠ i : y_p = y_i}, A(i) = {a ≠ i};
    ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} log[exp(u_i·u_p/τ) / Σ_{a∈A(i)} exp(u_i·u_a/τ)]; L = mean_i ℓ_i.
    The factor τ/τ_base of the reference implementation is 1 (spec: base temperature = τ).  The row
    maximum is subtracted before exp; anchors with an empty P(i) are left out of the mean.  fp32.
    """
    u = features.float()
    n = u.shape[0]
    logits = u @ u.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=u.device)
    positive = (labels[:, None] == labels[None, :]) & not_self
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    count = positive.sum(1)
    mean_log_prob_pos = (log_prob * positive).sum(1) / count.clamp_min(1)
    # mean over anchors with a positive, as a weighted sum: boolean-mask indexing syncs on CUDA
    has_positive = (count > 0).to(mean_log_prob_pos.dtype)
    return -(mean_log_prob_pos * has_positive).sum() / has_positive.sum()


def two_view_supcon(u_student: Tensor, u_teacher: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """SupCon over the 2B views {u_S(x_i), u_T(x_i)}, each labelled by its image's y (CPSC, spec §3.4)."""
    return supcon_loss(torch.cat([u_student, u_teacher]), torch.cat([labels, labels]), temperature)


class FrozenAdapter(nn.Module):
    """Linear(d_in, d_in)-ReLU-Linear(d_in, d_out), bias-free, frozen at its random init (CPSC, spec §3.4 [ours]).

    Maps L2-normalized student features to the teacher's width when they differ; the output is
    re-normalized unless ``renorm`` is False (the released code's behaviour).
    """

    def __init__(self, d_in: int, d_out: int, renorm: bool = True) -> None:
        super().__init__()
        # Bias-free (spec §3.4): default-initialised biases make the outputs on unit-norm inputs nearly
        # one direction (mean cosine 0.92-0.97), i.e. a constant student view.
        self.net = nn.Sequential(nn.Linear(d_in, d_in, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(d_in, d_out, bias=False))
        self.renorm = renorm
        self.requires_grad_(False)

    def forward(self, u: Tensor) -> Tensor:
        out = self.net(u)
        return F.normalize(out, dim=1) if self.renorm else out
