"""Pure loss, metric and rank functions (numpy and torch, no Ray)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HINGE_MARGIN = 2.0


def fitness(logits: np.ndarray, labels: np.ndarray, loss: str) -> np.ndarray:
    """Per-candidate fitness (lower is better) of logits ``(k, B, C)`` against ``labels (B,)``.

    >>> round(float(fitness(np.array([[[2.0, 0.0]]]), np.array([0]), "hinge")[0]), 3)
    0.0
    """
    # Contiguous: torch refuses views with negative strides (a population reversed).
    t = torch.as_tensor(np.ascontiguousarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.ascontiguousarray(labels)).expand(t.shape[0], -1)
    return task_loss(t, y, loss).numpy()


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


def metric(logits: np.ndarray, labels: np.ndarray, name: str) -> float:
    """Accuracy, or binary F1 with class 1 positive (MRPC, as BBT)."""
    pred = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    if name == "accuracy":
        return float((pred == labels).mean())
    if name == "f1":
        tp = float(((pred == 1) & (labels == 1)).sum())
        fp = float(((pred == 1) & (labels != 1)).sum())
        fn = float(((pred != 1) & (labels == 1)).sum())
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    raise ValueError(f"metric must be 'accuracy' or 'f1', but got {name!r}.")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant.

    >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
    0.5
    """
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their average rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks
