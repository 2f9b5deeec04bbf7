"""Fitness, metrics and ranks in numpy (gdfo_ray/metrics.py), which the driver needs without torch."""

import numpy as np
import pytest

from gdfo_ray.metrics import fitness, metric, spearman


def test_ce_fitness_matches_definition():
    logits = np.array([[[2.0, 0.0], [0.0, 1.0]]])
    labels = np.array([0, 0])
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(1 / (1 + np.e))])
    assert fitness(logits, labels, "ce")[0] == pytest.approx(expected)


def test_hinge_is_zero_beyond_margin_and_linear_inside():
    assert fitness(np.array([[[3.0, 0.0, 0.5]]]), np.array([0]), "hinge")[0] == 0.0
    assert fitness(np.array([[[1.0, 0.0]]]), np.array([0]), "hinge")[0] == pytest.approx(1.0)


def test_metrics():
    logits = np.array([[0, 1], [0, 1], [1, 0], [1, 0]], dtype=float)
    labels = np.array([1, 0, 1, 0])
    assert metric(logits, labels, "accuracy") == 0.5
    assert metric(logits, labels, "f1") == pytest.approx(0.5)  # tp=1, fp=1, fn=1


def test_spearman_handles_ties_and_constants():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([1, 2, 3, 4.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1, 2, 3.0]), np.ones(3)))


def test_fitness_accepts_a_reversed_population():
    logits = np.random.default_rng(0).normal(size=(5, 4, 3))
    labels = np.array([0, 1, 2, 1])
    np.testing.assert_allclose(fitness(logits[::-1], labels, "ce"), fitness(logits, labels, "ce")[::-1])
