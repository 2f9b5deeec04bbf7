"""The methods' generation steps (gdfo_ray/methods.py) on the synthetic black box: gdfo's candidates,
its update's settings, the random control."""

import numpy as np
import pytest

import torch

from gdfo_ray import ConfigError
from gdfo_ray.api import run
from gdfo_ray.metrics import fitness
from synthetic_blackbox import D, setup_synthetic


def _recorded(driver, monkeypatch):
    """Every population the teacher scored, and every harmonize call's (arguments, result)."""
    import gdfo_ray.methods as methods

    populations, calls = [], []
    real_evaluate = driver.teacher.query

    def query(prompts, split, ids):
        logits = real_evaluate(prompts, split, ids)
        if split == "train" and len(prompts) > 1:
            populations.append((prompts, logits))
        return logits

    def recording(*args, **kwargs):
        out = real_harmonize(*args, **kwargs)
        calls.append((args, out))
        return out

    real_harmonize = methods.harmonize
    monkeypatch.setattr(driver.teacher, "query", query)
    monkeypatch.setattr(methods, "harmonize", recording)
    return populations, calls


def test_injected_gradient_candidate_is_ranked_and_diagnostics_recorded(monkeypatch):
    driver, _ = setup_synthetic("gdfo", 1, budget=40)
    populations, calls = _recorded(driver, monkeypatch)
    history = driver.run().history
    assert history[0]["z_gd_rank"] is None
    for t in range(1, len(history)):
        prompts, logits = populations[t]
        # The population opens with the last generation's gradient candidate; its rank is among the teacher's fitness.
        np.testing.assert_allclose(prompts[0], driver.space.project(calls[t - 1][1].z_gd)[0], rtol=1e-5, atol=1e-6)
        F = fitness(logits, driver.data.train.label, "ce")
        assert history[t]["z_gd_rank"] == 1 + int((F < F[0]).sum())
    assert len({r["z_gd_rank"] for r in history[1:]}) > 1
    for key in ("rho", "fidelity", "kd_loss", "student_loss", "teacher_s", "student_s"):
        assert key in history[-1]


@pytest.mark.parametrize("control", ["none", "random"])
def test_random_control_moves_by_the_same_length_elsewhere(monkeypatch, control):
    driver, _ = setup_synthetic("gdfo", 2, budget=40, control=control)
    grads = []
    real_grad = driver.student.grad_z
    monkeypatch.setattr(driver.student, "grad_z", lambda z: grads.append(real_grad(z)) or grads[-1])
    _, calls = _recorded(driver, monkeypatch)
    driver.run()
    assert len(calls) == len(grads) == 5
    for (args, out), (_, student_grad) in zip(calls, grads):
        m_new, sigma, used = args[1], args[2], args[3]
        assert np.linalg.norm(out.z_gd - m_new) == pytest.approx(0.5 * sigma * np.sqrt(D))  # the same length
        cos = float(used @ student_grad / np.linalg.norm(used) / np.linalg.norm(student_grad))
        if control == "none":
            assert cos == pytest.approx(1.0)
        else:  # a direction drawn apart from the student's gradient
            assert abs(cos) < 0.9


def test_a_gradient_candidate_that_beats_every_sample_takes_the_mean_and_sigma_is_kept(monkeypatch):
    driver, _ = setup_synthetic("gdfo", 1, budget=80, mean_to_best=True, keep_sigma=True, gate="none")
    populations, calls = _recorded(driver, monkeypatch)
    es = driver.state.method.es
    sigmas = []
    real_tell = es.tell
    monkeypatch.setattr(es, "tell", lambda X, F: (sigmas.append(float(es.sigma)), real_tell(X, F)))
    history = driver.run().history
    jumped = [t for t in range(1, len(history)) if history[t]["mean_jumped"]]
    assert jumped and len(jumped) < len(history) - 1
    for t in range(1, len(history)):
        F = fitness(populations[t][1], driver.data.train.label, "ce")
        assert bool(history[t]["mean_jumped"]) == bool(F[0] < F[1:].min())
        if history[t]["mean_jumped"]:  # the gradient was taken at the candidate the mean jumped to
            np.testing.assert_allclose(calls[t][0][1], calls[t - 1][1].z_gd)
    # gate none: the mean always moves toward z_gd, so no generation starts with a smaller sigma than the last one.
    assert all(out.weight == 0.5 for _, out in calls)
    assert all(later >= earlier - 1e-12 for earlier, later in zip(sigmas, sigmas[1:]))


def test_a_line_of_gradient_candidates_replaces_samples_without_extra_calls(monkeypatch):
    driver, teacher = setup_synthetic("gdfo", 1, budget=40, n_candidates=3)
    populations, calls = _recorded(driver, monkeypatch)
    history = driver.run().history
    assert [r["calls"] for r in history] == [8, 16, 24, 32, 40]
    for t in range(1, len(history)):
        np.testing.assert_allclose(populations[t][0][:3], driver.space.project(calls[t - 1][1].candidates),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="n_candidates=8 leaves no CMA-ES sample"):
        setup_synthetic("gdfo", 1, n_candidates=8)


def test_warmup_takes_gradient_steps_of_one_call_then_cma_starts_from_the_best():
    driver, teacher = setup_synthetic("gdfo", 1, budget=40, warmup_steps=4)
    with torch.no_grad():  # an exact student from the start, as the oracle is
        driver.student.W.copy_(torch.as_tensor(teacher.V @ driver.space.A.T, dtype=torch.float32))
    after_warmup = {}
    driver.hooks.append(lambda d, row: row["generation"] == 4 and after_warmup.update(
        mean=d.state.method.es.mean.copy(), best=d.state.best_train[0].copy()))
    history = driver.run().history
    assert [r["calls"] for r in history] == [1, 2, 3, 4, 12, 20, 28, 36]
    assert history[0]["warmup_accepted"] == 1.0  # the first step is always kept
    assert history[3]["fitness_best"] < history[0]["fitness_best"]  # the exact-direction steps made progress
    # Every kept step was the best so far: CMA-ES starts from the best point the warm-up paid for.
    np.testing.assert_allclose(after_warmup["mean"], after_warmup["best"])


def test_lq_cma_spends_fewer_calls_a_generation_and_resumes_after_a_crash(tiny_config, tmp_path, crash_after):
    full = run(tiny_config(method="lq_cma", output_dir=str(tmp_path / "full")), progress=None)
    calls = [r["calls"] for r in full.history]
    spent = np.diff([0] + calls)
    assert all(1 <= c <= 4 for c in spent) and min(spent) < 4  # the surrogate spared some candidates a call
    assert [r["evaluated"] for r in full.history] == spent.tolist()
    crash_after(2)
    config = tiny_config(method="lq_cma", output_dir=str(tmp_path / "cut"))
    with pytest.raises(crash_after.error):
        run(config, progress=None)
    crash_after(None)
    resumed = run(config, resume=True, progress=None)  # the surrogate's model travels in the checkpoint
    assert [r["calls"] for r in resumed.history] == calls
    np.testing.assert_allclose(resumed.best_z, full.best_z)


def test_guided_samples_join_the_population_after_the_gradient_candidate_as_drawn(monkeypatch):
    driver, _ = setup_synthetic("gdfo", 3, budget=48, guided_share=0.25, guided_k=2, guided_alpha=0.5)
    populations, calls = _recorded(driver, monkeypatch)
    method = driver.state.method
    drawn = []
    real = method.__class__.step

    def step(self, ctx):
        out = real(self, ctx)
        drawn.append(None if self.z_guided is None else self.z_guided.copy())
        return out

    monkeypatch.setattr(method.__class__, "step", step)
    history = driver.run().history
    assert [r["calls"] for r in history] == [8, 16, 24, 32, 40, 48]  # they take CMA-ES's places: no extra calls
    assert method.n_guided == 2 and len(method.grads) == 2
    for t in range(1, len(history)):
        prompts = populations[t][0]
        np.testing.assert_allclose(prompts[1:3], driver.space.project(drawn[t - 1]), rtol=1e-5, atol=1e-6)
        assert 1 <= history[t]["guided_rank"] <= 8
    with pytest.raises(ConfigError, match="guided_share=0.8 gives 6 guided samples"):
        setup_synthetic("gdfo", 1, guided_share=0.8)


def test_the_gradient_step_grows_after_a_win_and_shrinks_after_a_loss(monkeypatch):
    driver, _ = setup_synthetic("gdfo", 1, budget=80, adapt_eta=True, exact_student=True)
    populations, calls = _recorded(driver, monkeypatch)
    history = driver.run().history
    scale = 1.0
    for t in range(1, len(history)):
        F = fitness(populations[t][1], driver.data.train.label, "ce")
        scale = min(16.0, scale * 1.5) if F[0] < F[1:].min() else max(1 / 16, scale * 0.5)
        assert history[t]["eta_scale"] == pytest.approx(scale)
        assert calls[t][0][4] == pytest.approx(0.5 * scale)  # the eta harmonize used for the next candidate
    assert len({r["eta_scale"] for r in history[1:]}) > 1
