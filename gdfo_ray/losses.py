"""The losses the students train on, in torch; the fitness and metrics the driver computes are in
:mod:`gdfo_ray.metrics` (numpy), re-exported here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gdfo_ray.metrics import HINGE_MARGIN, fitness, metric, spearman

__all__ = ["HINGE_MARGIN", "fitness", "kd_loss", "metric", "pairwise_rank_loss", "spearman", "task_loss"]



def task_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss over the last-but-one axis: ``(..., B, C)`` and ``(..., B)`` -> ``(...)``."""
    if loss == "ce":
        logp = F.log_softmax(logits, dim=-1)
        return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(-1)
    if loss == "hinge":  # multi-class hinge: every wrong class must trail the gold one by the margin
        gold = logits.gather(-1, labels.unsqueeze(-1))
        margins = (HINGE_MARGIN - (gold - logits)).clamp(min=0)
        wrong = torch.ones_like(logits).scatter(-1, labels.unsqueeze(-1), 0.0)
        return (margins * wrong).sum(-1).mean(-1)
    raise ValueError(f"loss must be 'ce' or 'hinge', but got {loss!r}.")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float,
            beta: float) -> torch.Tensor:
    """``tau^2 KL(softmax(Y/tau) || softmax(S/tau)) + beta CE(S, y)`` averaged over rows (docs/method.md 3)."""
    p_teacher = F.log_softmax(teacher / tau, dim=-1)
    p_student = F.log_softmax(student / tau, dim=-1)
    kl = F.kl_div(p_student, p_teacher, log_target=True, reduction="batchmean")
    return tau**2 * kl + beta * F.cross_entropy(student, labels)


def pairwise_rank_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logistic loss on every ordered pair: the student's fitness order should match the teacher's."""
    diff_pred = predicted[:, None] - predicted[None, :]
    sign = torch.sign(target[:, None] - target[None, :])
    mask = sign != 0
    if not mask.any():
        return predicted.sum() * 0.0
    return F.softplus(-sign[mask] * diff_pred[mask]).mean()
