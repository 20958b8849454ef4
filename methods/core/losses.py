"""Standard losses of spec §1.1, computed in fp32 even under autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_divergence(teacher_logits: Tensor, student_logits: Tensor, tau: float = 1.0) -> Tensor:
    """KL_τ(T‖S), batch mean (spec §1.1): (1/B) Σ_i Σ_c p_T (log p_T − log p_S), p = softmax(z/τ)."""
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def kd_loss(teacher_logits: Tensor, student_logits: Tensor, tau: float) -> Tensor:
    """Hinton's soft-target loss τ²·KL_τ(T‖S) (spec §1.1, §4.1)."""
    return tau * tau * kl_divergence(teacher_logits, student_logits, tau)


def l1_discrepancy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean absolute difference of logits over all elements (DFAD's L_S, spec §3.1)."""
    return (teacher_logits.float() - student_logits.float()).abs().mean()


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE on logits, batch mean, fp32 (spec §1.1)."""
    return F.cross_entropy(logits.float(), target)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all elements, fp32 (spec §1.1)."""
    return F.mse_loss(a.float(), b.float())


def batch_mean_entropy_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """p̄ = batch-mean softmax (spec §1.1) and log p̄, fp32."""
    p_bar = F.softmax(logits.float(), dim=1).mean(0)
    return p_bar, torch.log(p_bar.clamp_min(1e-12))
