"""Fitness, metrics and ranks in numpy: what the driver computes on the teacher's answers, free of torch."""

from __future__ import annotations

import numpy as np

HINGE_MARGIN = 2.0


def fitness(logits: np.ndarray, labels: np.ndarray, loss: str) -> np.ndarray:
    """Per-candidate fitness (lower is better) of logits ``(k, B, C)`` against ``labels (B,)``, in float64.

    ``ce`` is the mean cross-entropy; ``hinge`` the mean multi-class hinge, every wrong class
    trailing the gold one by :data:`HINGE_MARGIN` (what :func:`gdfo_ray.losses.task_loss` trains).

    >>> round(float(fitness(np.array([[[2.0, 0.0]]]), np.array([0]), "hinge")[0]), 3)
    0.0
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.broadcast_to(np.asarray(labels), x.shape[:-1])
    gold = np.take_along_axis(x, y[..., None], axis=-1)
    if loss == "ce":
        top = x.max(axis=-1, keepdims=True)
        logsumexp = top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
        return (logsumexp - gold)[..., 0].mean(-1)
    if loss == "hinge":
        margins = np.clip(HINGE_MARGIN - (gold - x), 0.0, None)
        wrong = np.ones_like(x)
        np.put_along_axis(wrong, y[..., None], 0.0, axis=-1)
        return (margins * wrong).sum(-1).mean(-1)
    raise ValueError(f"loss must be 'ce' or 'hinge', but got {loss!r}.")


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
