"""The students' torch losses (gdfo_ray/losses.py), and their agreement with the driver's numpy fitness."""

import numpy as np
import pytest
import torch

from gdfo_ray.losses import kd_loss, pairwise_rank_loss


def test_kd_loss_vanishes_when_student_equals_teacher():
    y = torch.randn(5, 3)
    assert float(kd_loss(y, y, torch.zeros(5, dtype=torch.long), tau=2.0, beta=0.0)) == pytest.approx(0, abs=1e-6)
    assert float(kd_loss(y, y + torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 2.0, 0.0)) > 0


def test_rank_loss_prefers_matching_order():
    target = torch.tensor([0.1, 0.2, 0.3])
    assert pairwise_rank_loss(target * 10, target) < pairwise_rank_loss(-target * 10, target)


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
