"""The driver on a synthetic black box where a linear student can be a perfect surrogate."""

import numpy as np
import pytest
import torch

from gdfo_ray import ConfigError, GDFOConfig, TeacherError
from gdfo_ray.driver import Driver
from gdfo_ray.losses import fitness, kd_loss, task_loss
from gdfo_ray.prompt import PromptSpace, PromptSpaceSpec
from gdfo_ray.tasks import PRESETS, Split, TaskData

D, N, H, R, B = 40, 2, 8, 10, 16


class SyntheticTeacher:
    """logits(P, x_b) = X_b @ V vec(P): linear in the prompt, so in z as well."""

    def __init__(self, seed=0, nan_after=None):
        rng = np.random.default_rng(seed)
        self.V = rng.normal(size=(R, N * H))
        self.X = {s: rng.normal(size=(B, 2, R)) for s in ("train", "dev", "test")}
        self.calls = 0
        self.nan_after = nan_after

    def query(self, prompts, split, ids):
        self.calls += len(prompts)
        feats = np.asarray(prompts).reshape(len(prompts), -1) @ self.V.T  # (k, R)
        logits = np.einsum("bcr,kr->kbc", self.X[split][ids], feats)
        if self.nan_after is not None and self.calls > self.nan_after:
            logits[-1, 0, 0] = np.nan
        return logits


class SurrogateStudent:
    """A linear student X_b @ (W z + c); W = V A^T makes it exact. Trained only by distillation."""

    def __init__(self, teacher, lr=0.05):
        self.X = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in teacher.X.items()}
        self.W = torch.zeros(R, D, requires_grad=True)
        self.c = torch.zeros(R, requires_grad=True)
        self.opt = torch.optim.Adam([self.W, self.c], lr=lr)
        self.labels = None

    def _logits(self, z, rows, split):
        return torch.einsum("ncr,nr->nc", self.X[split][rows], z @ self.W.T + self.c)

    def observe(self, Z, logits, rows):
        """It learns from replayed batches only."""

    def distill(self, batches):
        for batch in batches:
            self.opt.zero_grad()
            z = torch.as_tensor(batch.z, dtype=torch.float32)
            loss = kd_loss(self._logits(z, torch.as_tensor(batch.rows), "train"),
                           torch.as_tensor(batch.teacher), torch.as_tensor(batch.labels), 1.0, 0.0)
            loss.backward()
            self.opt.step()
        return loss.item()

    def _fitness(self, Z, rows=None):
        k = Z.shape[0]
        rows = torch.arange(B) if rows is None else torch.as_tensor(rows)
        logits = self._logits(Z.repeat_interleave(len(rows), 0), rows.repeat(k), "train").view(k, len(rows), 2)
        return task_loss(logits, self.labels[rows].expand(k, -1), "ce")

    def predict_fitness(self, Z, rows=None):
        with torch.no_grad():
            return self._fitness(torch.as_tensor(Z, dtype=torch.float32), rows).numpy()

    def grad_z(self, z):
        zt = torch.as_tensor(z, dtype=torch.float32).reshape(1, -1).requires_grad_(True)
        loss = self._fitness(zt)[0]
        (g,) = torch.autograd.grad(loss, zt)
        return loss.item(), g[0].numpy()


def _setup(method, seed, budget=320, control="none", nan_after=None, fidelity_rows=32, **harmonize):
    config = GDFOConfig.from_dict({
        "method": method, "seed": seed, "prompt": {"intrinsic_dim": D, "n_prompt_tokens": N},
        "search": {"budget_calls": budget, "popsize": 8, "sigma0": 0.2, "eval_every_calls": 40, "loss": "ce"},
        "student": {"k_steps": 30, "batch_rows": 64, "fidelity_rows": fidelity_rows},
        "harmonize": {"eta": 0.5, "gamma": 0.5, "control": control, **harmonize},
    })
    teacher = SyntheticTeacher(seed, nan_after)
    space = PromptSpace(PromptSpaceSpec(D, N, H, 1.0, 1.0, "zeros", seed, ()))
    # Labels are the teacher's own answers at a hidden z*, so the loss can approach 0.
    z_star = np.random.default_rng(seed + 100).normal(size=D) * 3
    labels = teacher.query(space.project(z_star), "train", np.arange(B))[0].argmax(-1)
    teacher.calls = 0
    split = Split(["x"] * B, None, labels)
    data = TaskData(PRESETS["sst2"], split, split, split, "synthetic")
    student = SurrogateStudent(teacher)
    student.labels = torch.as_tensor(labels)
    return Driver(config, data, teacher, student if config.uses_student else None, space), teacher


def _calls_to_reach(history, target):
    return next((row["calls"] for row in history if row["fitness_best"] <= target), float("inf"))


def test_gdfo_reaches_target_in_clearly_fewer_calls_than_bbt():
    target = 0.1
    gdfo, bbt = [], []
    for seed in range(5):
        for method, out in (("gdfo", gdfo), ("bbt", bbt)):
            driver, _ = _setup(method, seed)
            out.append(_calls_to_reach(driver.run().history, target))
    assert np.median(gdfo) < 0.7 * np.median(bbt), (gdfo, bbt)


def test_budget_is_never_exceeded_and_teacher_calls_match():
    for method in ("bbt", "gdfo", "kd"):
        driver, teacher = _setup(method, 0, budget=30)
        state = driver.run()
        assert state.budget.spent == 24 == teacher.calls - state.budget.dev_calls
        assert [r["calls"] for r in state.history] == [8, 16, 24]


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
    driver, _ = _setup("gdfo", 1, budget=40)
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
    driver, _ = _setup("gdfo", 2, budget=40, control=control)
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
    driver, _ = _setup("gdfo", 1, budget=80, mean_to_best=True, keep_sigma=True, gate="none")
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
    driver, teacher = _setup("gdfo", 1, budget=40, n_candidates=3)
    populations, calls = _recorded(driver, monkeypatch)
    history = driver.run().history
    assert [r["calls"] for r in history] == [8, 16, 24, 32, 40]
    for t in range(1, len(history)):
        np.testing.assert_allclose(populations[t][0][:3], driver.space.project(calls[t - 1][1].candidates),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="n_candidates=8 leaves no CMA-ES sample"):
        _setup("gdfo", 1, n_candidates=8)


def test_warmup_takes_gradient_steps_of_one_call_then_cma_starts_from_the_best():
    driver, teacher = _setup("gdfo", 1, budget=40, warmup_steps=4)
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


def test_nan_from_teacher_stops_with_the_candidate_named():
    driver, _ = _setup("bbt", 0, nan_after=10)
    with pytest.raises(TeacherError, match=r"candidate\(s\) \[7\]"):
        driver.run()


def test_fidelity_compares_student_and_teacher_on_the_same_rows_and_leaves_the_run_unchanged():
    runs = {}
    for n in (4, B):
        driver, _ = _setup("gdfo", 3, budget=160, fidelity_rows=n)
        runs[n] = (driver, driver.run().history)
    few, every = runs[4], runs[B]
    assert len(few[0].fidelity_rows) == 4 and len(set(few[0].fidelity_rows)) == 4
    assert list(every[0].fidelity_rows) == list(range(B))
    # Only the diagnostic differs: the search and the student took the same steps.
    assert [r["fitness_best"] for r in few[1]] == [r["fitness_best"] for r in every[1]]
    assert [r["fidelity"] for r in few[1]] != [r["fidelity"] for r in every[1]]
    # The exact surrogate student ranks the population as the teacher does on those rows.
    assert np.median([r["fidelity"] for r in every[1][5:]]) > 0.5
