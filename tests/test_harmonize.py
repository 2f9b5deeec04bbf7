"""The harmonized update (gdfo_ray/harmonize.py), a pure function."""

import numpy as np
import pytest

from gdfo_ray.harmonize import harmonize


def test_harmonize_step_length_and_gating():
    rng = np.random.default_rng(0)
    d = 50
    m_prev, m_new, g = rng.normal(size=d), rng.normal(size=d), rng.normal(size=d)
    h = harmonize(m_prev, m_new, 0.3, g, eta=0.5, gamma=1.0)
    assert np.linalg.norm(h.z_gd - m_new) == pytest.approx(0.5 * 0.3 * np.sqrt(d))
    move = m_new - m_prev
    assert h.rho == pytest.approx(float(-g @ move / np.linalg.norm(g) / np.linalg.norm(move)))
    np.testing.assert_allclose((h.z_gd - m_new) @ g, -np.linalg.norm(h.z_gd - m_new) * np.linalg.norm(g))  # along -g
    expected_shift = max(h.rho, 0) * (h.z_gd - m_new)
    np.testing.assert_allclose(h.m_next - m_new, expected_shift)
    inject_only = harmonize(m_prev, m_new, 0.3, g, eta=0.5, gamma=0.0)
    np.testing.assert_array_equal(inject_only.m_next, m_new)
    # A gradient that disagrees with CMA's move never moves the mean.
    against = harmonize(np.zeros(2), np.array([1.0, 0.0]), 1.0, np.array([1.0, 0.0]), 0.5, 1.0)
    assert against.rho == pytest.approx(-1.0)
    np.testing.assert_array_equal(against.m_next, [1.0, 0.0])
    zero = harmonize(m_prev, m_new, 0.3, np.zeros(d), 0.5, 1.0)
    assert zero.rho == 0.0 and np.array_equal(zero.m_next, m_new)


def test_ungated_update_and_a_line_of_gradient_candidates():
    m_prev, m_new, g = np.zeros(4), np.array([1.0, 0, 0, 0]), np.array([1.0, 0, 0, 0])  # rho = -1
    gated = harmonize(m_prev, m_new, 1.0, g, eta=0.5, gamma=0.5)
    assert gated.weight == 0.0 and np.array_equal(gated.m_next, m_new)
    free = harmonize(m_prev, m_new, 1.0, g, eta=0.5, gamma=0.5, gate="none")
    assert free.weight == 0.5
    np.testing.assert_allclose(free.m_next, m_new + 0.5 * (free.z_gd - m_new))
    line = harmonize(m_prev, m_new, 1.0, g, eta=0.5, gamma=0.5, n_candidates=3)
    np.testing.assert_allclose(line.candidates[:, 0], 1.0 - np.array([0.5, 1.0, 2.0]))  # 0.5 x sqrt(4) x (1/2, 1, 2)
    np.testing.assert_allclose(line.candidates[1], line.z_gd)
    assert not line.candidates[:, 1:].any()
    with pytest.raises(ValueError, match="gate"):
        harmonize(m_prev, m_new, 1.0, g, 0.5, 0.5, gate="sometimes")


def test_the_gate_off_measures_rho_but_neither_injects_nor_moves():
    m_prev, m_new, g = np.zeros(3), np.array([1.0, 0, 0]), np.array([-1.0, 0, 0])  # rho = +1: rho would move it
    off = harmonize(m_prev, m_new, 1.0, g, eta=0.5, gamma=1.0, gate="off", n_candidates=3)
    assert off.rho == pytest.approx(1.0) and off.weight == 0.0
    assert off.candidates.shape == (0, 3)
    np.testing.assert_array_equal(off.m_next, m_new)
