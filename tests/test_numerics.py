"""Pure functions: losses, metrics, ranks, the harmonized update, the budget, the prompt space."""

import numpy as np
import pytest
import torch

from gdfo_ray.budget import CallBudget
from gdfo_ray.exceptions import BudgetExhaustedError
from gdfo_ray.harmonize import harmonize
from gdfo_ray.losses import fitness, kd_loss, metric, pairwise_rank_loss, spearman
from gdfo_ray.prompt import PromptSpace, PromptSpaceSpec, load_prompt, save_prompt


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


def test_budget_is_never_exceeded():
    budget = CallBudget(total=10)
    budget.charge(6)
    assert not budget.can_afford(5)
    with pytest.raises(BudgetExhaustedError, match="6 of 10 spent"):
        budget.charge(5)
    assert budget.spent == 6


def test_prompt_space_is_seeded_and_roundtrips(tmp_path):
    spec = PromptSpaceSpec(6, 2, 4, 1.0, 0.5, "zeros", 7, ())
    a, b = PromptSpace(spec), PromptSpace(spec)
    np.testing.assert_array_equal(a.A, b.A)
    assert a.A.std() == pytest.approx(0.5 / np.sqrt(6), rel=0.5)
    z = np.arange(6.0)
    save_prompt(str(tmp_path / "p.json"), z, a, {"task": "sst2"})
    z2, space, meta = load_prompt(str(tmp_path / "p.json"))
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_allclose(space.project(z2), a.project(z))
    assert meta["task"] == "sst2"


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


def test_the_driver_and_the_methods_need_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['ray'] = None; "
            "import gdfo_ray.driver, gdfo_ray.methods, gdfo_ray.harmonize, gdfo_ray.replay, gdfo_ray.metrics")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
