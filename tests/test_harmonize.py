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


def test_the_gradient_basis_is_orthonormal_spans_the_last_k_gradients_and_skips_bad_ones():
    from gdfo_ray.harmonize import gradient_basis

    rng = np.random.default_rng(0)
    grads = [rng.normal(size=20) for _ in range(5)]
    basis = gradient_basis(grads + [np.zeros(20), np.full(20, np.nan)], 3)  # the last 3 include two bad ones
    assert basis.shape == (20, 1)
    basis = gradient_basis(grads, 3)
    assert basis.shape == (20, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-10)
    for g in grads[-3:]:  # each of the last three lies in the span
        np.testing.assert_allclose(basis @ (basis.T @ g), g, atol=1e-10)
    assert basis[:, 0] @ grads[2] > 0  # the first direction points along its gradient
    assert gradient_basis([grads[0], 2 * grads[0]], 2).shape == (20, 1)  # a repeated direction counts once
    assert gradient_basis([], 2).size == 0


def test_guided_samples_put_a_share_of_their_variance_in_the_gradients_span_at_cma_es_length():
    from gdfo_ray.harmonize import gradient_basis, guided_samples

    d, sigma, alpha = 50, 0.3, 0.25
    rng = np.random.default_rng(1)
    basis = gradient_basis([rng.normal(size=d), rng.normal(size=d)], 2)
    z = guided_samples(np.ones(d), sigma, basis, alpha, 20000, np.random.default_rng(2)) - 1.0
    inside = z @ basis  # (n, 2): coordinates in the span
    outside = z - inside @ basis.T
    # Per direction: sigma^2 (alpha + d (1 - alpha) / k) inside the span, sigma^2 alpha outside it.
    np.testing.assert_allclose(inside.var(0), sigma**2 * (alpha + d * (1 - alpha) / 2), rtol=0.05)
    assert (outside**2).sum(1).mean() == pytest.approx(sigma**2 * alpha * (d - 2), rel=0.05)
    # As long as one of CMA-ES's own samples (sigma sqrt(d)), in expectation.
    assert (z**2).sum(1).mean() == pytest.approx(sigma**2 * d, rel=0.05)


def test_pycma_takes_injected_guided_samples_as_drawn():
    """Injected with ``force``, they come back from ask() unchanged and move the mean by their weight, unclipped."""
    import cma

    from gdfo_ray.harmonize import gradient_basis, guided_samples

    d = 30
    es = cma.CMAEvolutionStrategy(np.zeros(d), 0.4, {"seed": 3, "popsize": 10, "verbose": -9})
    rng = np.random.default_rng(4)
    for _ in range(3):
        basis = gradient_basis([rng.normal(size=d)], 1)
        drawn = guided_samples(es.mean.copy(), float(es.sigma), basis, 0.2, 4, rng)
        es.inject(list(drawn), force=True)
        X = np.asarray(es.ask())
        np.testing.assert_allclose(X[:4], drawn, rtol=0, atol=1e-12)  # up to rounding of m + sigma (x - m) / sigma
        F = rng.permutation(10).astype(float)  # the guided samples among the best and the worst
        m_old = es.mean.copy()
        es.tell(list(X), list(F))
        w = es.sp.weights.positive_weights
        chosen = X[np.argsort(F)[:len(w)]]
        np.testing.assert_allclose(es.mean, m_old + es.sp.cmean * (w @ (chosen - m_old)), atol=1e-12)
