"""A synthetic black box where a linear student can be a perfect surrogate: the driver's and the methods' bench.

Imported by the tests of the driver and of the methods (``pythonpath = ["tests"]``).
"""

import numpy as np
import torch

from gdfo_ray import GDFOConfig
from gdfo_ray.driver import Driver
from gdfo_ray.losses import kd_loss, task_loss
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


def setup_synthetic(method, seed, budget=320, control="none", nan_after=None, fidelity_rows=32, k_steps=30,
                    exact_student=False, **harmonize):
    """A driver on the synthetic black box; ``exact_student`` starts the student at the black box's own
    map (W = V A^T), so its gradient in z is exact before it has learned anything."""
    config = GDFOConfig.from_dict({
        "method": method, "seed": seed, "prompt": {"intrinsic_dim": D, "n_prompt_tokens": N},
        "search": {"budget_calls": budget, "popsize": 8, "sigma0": 0.2, "eval_every_calls": 40, "loss": "ce"},
        "student": {"k_steps": k_steps, "batch_rows": 64, "fidelity_rows": fidelity_rows},
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
    if exact_student:
        student.W.data = torch.as_tensor(teacher.V @ space.A.T, dtype=torch.float32)
    return Driver(config, data, teacher, student if config.uses_student else None, space), teacher


def calls_to_reach(history, target):
    return next((row["calls"] for row in history if row["fitness_best"] <= target), float("inf"))
