"""Fitness, metrics and ranks (gdfo_ray/metrics.py) and the students' losses (gdfo_ray/losses.py)."""

import numpy as np
import pytest
import torch

from gdfo_ray.losses import kd_loss, pairwise_rank_loss
from gdfo_ray.metrics import fitness, metric, spearman


def test_ce_fitness_matches_definition():
    logits = np.array([[[2.0, 0.0], [0.0, 1.0]]])
    labels = np.array([0, 0])
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(1 / (1 + np.e))])
    assert fitness(logits, labels, "ce")[0] == pytest.approx(expected)


def test_hinge_is_zero_beyond_margin_and_linear_inside():
    assert fitness(np.array([[[3.0, 0.0, 0.5]]]), np.array([0]), "hinge")[0] == 0.0
    assert fitness(np.array([[[1.0, 0.0]]]), np.array([0]), "hinge")[0] == pytest.approx(1.0)


def test_kd_loss_vanishes_when_student_equals_teacher():
    y = torch.randn(5, 3)
    assert float(kd_loss(y, y, torch.zeros(5, dtype=torch.long), tau=2.0, beta=0.0)) == pytest.approx(0, abs=1e-6)
    assert float(kd_loss(y, y + torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 2.0, 0.0)) > 0


def test_rank_loss_prefers_matching_order():
    target = torch.tensor([0.1, 0.2, 0.3])
    assert pairwise_rank_loss(target * 10, target) < pairwise_rank_loss(-target * 10, target)


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
    from gdfo_ray.losses import fitness

    logits = np.random.default_rng(0).normal(size=(5, 4, 3))
    labels = np.array([0, 1, 2, 1])
    np.testing.assert_allclose(fitness(logits[::-1], labels, "ce"), fitness(logits, labels, "ce")[::-1])


@pytest.mark.parametrize("loss", ["ce", "hinge"])
def test_the_drivers_numpy_fitness_is_the_students_torch_loss(loss):
    import torch

    from gdfo_ray.losses import task_loss
    from gdfo_ray.metrics import fitness as numpy_fitness

    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(17, 32, 4)) * 5, rng.integers(0, 4, size=32)
    expected = task_loss(torch.as_tensor(logits), torch.as_tensor(labels).expand(17, -1), loss).numpy()
    np.testing.assert_allclose(numpy_fitness(logits, labels, loss), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="loss must be"):
        numpy_fitness(logits, labels, "l2")
