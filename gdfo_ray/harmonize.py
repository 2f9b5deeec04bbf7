"""The harmonized update of GDFO (METHOD.md, step 5), as one pure function.

Symbols as in METHOD.md: ``m_prev`` = m_t (mean before tell), ``m_new`` = m'
(mean after tell), ``sigma`` = sigma', ``grad`` = g (gradient in z of the
student's task loss at m'), ``eta`` and ``gamma`` the two step parameters.
This version of the update is the project's own (the GDFO paper's equations
were not available in a readable form); it is documented in README.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Harmonized(NamedTuple):
    z_gd: np.ndarray  # the gradient candidate, injected into the next population
    m_next: np.ndarray  # the mean CMA-ES continues from
    rho: float  # agreement cos(-g, m' - m_t); 0 when either vector vanishes


def harmonize(m_prev: np.ndarray, m_new: np.ndarray, sigma: float, grad: np.ndarray, eta: float,
              gamma: float) -> Harmonized:
    """``z_GD = m' - eta sigma' sqrt(d) g/||g||``; ``m_next = m' + gamma max(rho, 0) (z_GD - m')``.

    >>> h = harmonize(np.zeros(2), np.array([1.0, 0.0]), 1.0, np.array([-1.0, 0.0]), 0.5, 1.0)
    >>> h.rho, h.z_gd.round(3).tolist(), h.m_next.round(3).tolist()
    (1.0, [1.707, 0.0], [1.707, 0.0])
    """
    d = m_new.shape[0]
    g_norm = float(np.linalg.norm(grad))
    if g_norm == 0.0 or not np.isfinite(g_norm):
        return Harmonized(m_new.copy(), m_new.copy(), 0.0)
    direction = -grad / g_norm
    z_gd = m_new + eta * sigma * np.sqrt(d) * direction
    move = m_new - m_prev
    move_norm = float(np.linalg.norm(move))
    rho = float(direction @ move / move_norm) if move_norm > 0 else 0.0
    m_next = m_new + gamma * max(rho, 0.0) * (z_gd - m_new)
    return Harmonized(z_gd, m_next, rho)
