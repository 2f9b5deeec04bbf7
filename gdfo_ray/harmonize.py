"""The harmonized update of GDFO (docs/method.md, step 5), as one pure function.

Symbols as in docs/method.md: ``m_prev`` = m_t (mean before tell), ``m_new`` = m'
(mean after tell), ``sigma`` = sigma', ``grad`` = g (gradient in z of the
student's task loss at m'), ``eta`` and ``gamma`` the two step parameters.
This version of the update is the project's own (the GDFO paper's equations
were not available in a readable form); docs/method.md documents it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gdfo_ray.config import GATES


class Harmonized(NamedTuple):
    z_gd: np.ndarray  # the gradient candidate at step length eta, which the mean moves toward
    m_next: np.ndarray  # the mean CMA-ES continues from
    rho: float  # agreement cos(-g, m' - m_t); 0 when either vector vanishes
    candidates: np.ndarray  # (k, d) every gradient candidate for the next population (line_steps(k) x eta)
    weight: float  # how far the mean moved toward z_gd, in [0, gamma]


def line_steps(n: int) -> np.ndarray:
    """The step lengths, in units of eta, of ``n`` gradient candidates: doubling around 1.

    >>> line_steps(1).tolist(), line_steps(3).tolist(), line_steps(4).tolist()
    ([1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0])
    """
    return 2.0 ** (np.arange(n) - n // 2)


def gradient_step(z: np.ndarray, grad: np.ndarray, length: float) -> np.ndarray:
    """``z`` moved by ``length`` along ``-grad``; unmoved when the gradient vanishes or is not finite.

    >>> gradient_step(np.zeros(2), np.array([3.0, 4.0]), 5.0).tolist()
    [-3.0, -4.0]
    """
    norm = float(np.linalg.norm(grad))
    if norm == 0.0 or not np.isfinite(norm):
        return z.copy()
    return z + length * (-grad / norm)


def harmonize(m_prev: np.ndarray, m_new: np.ndarray, sigma: float, grad: np.ndarray, eta: float,
              gamma: float, gate: str = "rho", n_candidates: int = 1) -> Harmonized:
    """``z_GD(s) = m' - s eta sigma' sqrt(d) g/||g||`` for s in :func:`line_steps`; ``m_next = m' + w (z_GD(1) - m')``.

    ``w = gamma max(rho, 0)`` with ``gate="rho"`` (the mean follows the gradient only as far
    as CMA-ES's own step agrees with it), ``w = gamma`` with ``gate="none"``. ``gate="off"``
    makes no candidate and leaves the mean (``w = 0``): CMA-ES alone, with ``rho`` still
    measured, so a run keeps bbt's exact trajectory while its student is distilled and scored.

    >>> h = harmonize(np.zeros(2), np.array([1.0, 0.0]), 1.0, np.array([-1.0, 0.0]), 0.5, 1.0)
    >>> h.rho, h.z_gd.round(3).tolist(), h.m_next.round(3).tolist()
    (1.0, [1.707, 0.0], [1.707, 0.0])
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {list(GATES)}, but got {gate!r}.")
    d = m_new.shape[0]
    g_norm = float(np.linalg.norm(grad))
    if g_norm == 0.0 or not np.isfinite(g_norm):
        return Harmonized(m_new.copy(), m_new.copy(), 0.0, m_new[None].copy(), 0.0)
    direction = -grad / g_norm
    step = eta * sigma * np.sqrt(d)
    z_gd = gradient_step(m_new, grad, step)
    move = m_new - m_prev
    move_norm = float(np.linalg.norm(move))
    rho = float(direction @ move / move_norm) if move_norm > 0 else 0.0
    if gate == "off":
        return Harmonized(z_gd, m_new.copy(), rho, np.empty((0, d)), 0.0)
    candidates = np.stack([gradient_step(m_new, grad, s * step) for s in line_steps(n_candidates)])
    weight = gamma * (max(rho, 0.0) if gate == "rho" else 1.0)
    return Harmonized(z_gd, m_new + weight * (z_gd - m_new), rho, candidates, weight)


def gradient_basis(grads: list, k: int) -> np.ndarray:
    """An orthonormal basis ``(d, r)``, r <= k, of the span of the last ``k`` finite, non-zero gradients.

    >>> np.abs(gradient_basis([np.array([2.0, 0.0]), np.array([1.0, 1.0])], 2)).round(3).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    usable = [g for g in grads[-k:] if np.all(np.isfinite(g)) and np.linalg.norm(g) > 0]
    if not usable:
        return np.empty((0, 0))
    q, r = np.linalg.qr(np.stack(usable, axis=1))
    keep = np.abs(np.diag(r)) > 1e-10 * np.abs(r).max()  # drop gradients that repeat the span of earlier ones
    q = q[:, keep]
    return q * np.sign(np.diag(r)[keep])[None, :]  # each direction along its gradient, not against it


def guided_samples(mean: np.ndarray, sigma: float, basis: np.ndarray, alpha: float, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of guided ES (Maheswaranathan et al., 2019) around ``mean``, ``(n, d)``.

    Their covariance is ``sigma^2 d [(alpha/d) I + ((1 - alpha)/k) U U^T]`` with ``U = basis`` (d, k):
    GES's, times d, so that a sample is as long as one of CMA-ES's own (about ``sigma sqrt(d)``)
    and pycma takes it as drawn. A share ``1 - alpha`` of the variance lies in the gradients'
    span, so a biased gradient still helps and never decides alone. Without a basis, isotropic.

    >>> z = guided_samples(np.zeros(400), 1.0, np.eye(400)[:, :1], 0.5, 2000, np.random.default_rng(0))
    >>> round(float((z ** 2).sum(1).mean() / 400), 1), round(float(z[:, 0].var()), -1)
    (1.0, 200.0)
    """
    d = mean.shape[0]
    full = rng.standard_normal((n, d)) * np.sqrt(alpha if basis.size else 1.0)
    if basis.size:
        k = basis.shape[1]
        full = full + np.sqrt(d * (1.0 - alpha) / k) * rng.standard_normal((n, k)) @ basis.T
    return mean[None, :] + sigma * full
