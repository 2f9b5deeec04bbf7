"""The white-box side: a local student kept close to the teacher by distillation (docs/method.md, step 3).

The student owns its projection ``P_S(z) = P0_S + A_S z`` and A_S is trained: the
student must learn how a move in z changes the *teacher's* answers. Everything
here is free of Ray; a student worker actor hosts one :class:`StudentTrainer`,
and data-parallel training averages :meth:`StudentTrainer.compute_grads` across
workers before each :meth:`StudentTrainer.apply_grads`.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from torch import nn

from gdfo_ray.config import GDFOConfig
from gdfo_ray.losses import kd_loss, pairwise_rank_loss, task_loss
from gdfo_ray.models import build_prompted_lm, host_tensor, resolve_dtype, set_threads
from gdfo_ray.replay import DistillBatch, ReplayBuffer
from gdfo_ray.student_group import StudentGroup
from gdfo_ray.tasks import TaskData

__all__ = ["DistillBatch", "GPStudent", "ReplayBuffer", "SmoothField", "StudentGroup", "StudentModel", "StudentTrainer",
           "make_student"]


class SmoothField:
    """A fixed random smooth function of z with unit variance: random Fourier features of an RBF kernel.

    Its covariance between two points at distance r is about ``exp(-r^2 / (2 length^2))``, so
    values a population's width apart are partly independent, as a poor student's errors are,
    while its gradient is exact for the function it is. ``oracle:S`` adds it to the oracle.
    """

    def __init__(self, dim: int, length: float, seed: int, n_features: int = 512, device: Optional[torch.device] = None):
        gen = torch.Generator().manual_seed(seed)
        self.W = (torch.randn(n_features, dim, generator=gen, dtype=torch.float64) / length).float().to(device)
        self.b = (torch.rand(n_features, generator=gen, dtype=torch.float64) * 2 * np.pi).float().to(device)
        self.norm = float(np.sqrt(2.0 / n_features))

    def __call__(self, Z: torch.Tensor) -> torch.Tensor:
        """Values (k,) at candidates ``Z`` (k, d)."""
        return self.norm * torch.cos(Z.to(self.W.dtype) @ self.W.T + self.b).sum(-1)


class StudentModel(nn.Module):
    """A :class:`~gdfo_ray.models.PromptedLM` behind its own projection of z.

    A student of its own (``model.student`` an id or path) learns its projection from a
    random start. ``oracle`` and ``sibling:K`` are cut from the teacher and start from the
    teacher's own projection (:meth:`set_prompt_space`, before any forward): the oracle keeps
    it, and everything else, frozen, so its gradient in z is the teacher's; a sibling trains
    its projection and a residual head on the verbalizer scores (``verbalizer_residual``).
    """

    def __init__(self, config: GDFOConfig, data: TaskData):
        super().__init__()
        self.spec = config.model.student_spec
        splits = {"train": data.train, "dev": data.dev, "test": data.test}
        if self.spec.reads_teacher:
            # The teacher's weights as the teacher computes them (its dtype and chunking); only the
            # trained parameters (projection, head) are float32.
            self.lm = build_prompted_lm(
                config.model.teacher, config.model.teacher_kind, data.spec, splits,
                readout="verbalizer" if self.spec.kind == "oracle" else "verbalizer_residual",
                dtype=config.model.dtype, device=config.model.device, max_text_tokens=config.task.max_text_tokens,
                max_rows_per_forward=config.model.max_rows_per_forward, need_lm_head=True, layers=self.spec.layers,
                max_tokens_per_forward=config.model.max_tokens_per_forward,
            )
            if config.model.kv_cache and not config.student.train_body:
                self.lm.cache_prefixes(["train"])
        else:
            self.lm = build_prompted_lm(
                config.model.student, config.model.student_kind, data.spec, splits, readout="auto", dtype="float32",
                device=config.model.device, max_text_tokens=config.task.max_text_tokens,
                max_rows_per_forward=config.student.max_rows_per_forward, need_lm_head=False,
                separate_text=config.student.text_cache,
            )
            if config.student.text_cache:
                # Every step and prediction of a run reads the train batch; other splits are read once or twice.
                # Only then: a causal-LM student would otherwise cache its text states even with a trained body.
                self.lm.cache_prefixes(["train"])
        d, n, h = config.prompt.intrinsic_dim, config.prompt.n_prompt_tokens, self.lm.hidden_size
        gen = torch.Generator().manual_seed(config.seeds.student_init)
        std = config.prompt.alpha * self.lm.embedding_std() / np.sqrt(d)
        self.A = nn.Parameter((torch.randn(d, n * h, generator=gen) * std).to(self.lm.device))
        vocab = self.lm.embeddings.weight.shape[0]
        ids = torch.randint(min(1000, vocab - 1), vocab, (n,), generator=gen)
        self.P0 = nn.Parameter(self.lm.embed_tokens(ids.tolist()).float().clone())
        frozen = self.spec.kind == "oracle"
        self.A.requires_grad_(not frozen)
        self.P0.requires_grad_(not frozen)
        self.lm.model.requires_grad_(config.student.train_body and not frozen)
        # A class shift linear in z, shared by all examples: how a move in z tilts the teacher toward a
        # class. It is learnt from few candidates (d x C weights), where A_S needs many.
        self.U = nn.Parameter(torch.zeros(d, data.spec.n_classes, device=self.lm.device),
                              requires_grad=config.student.z_shift and not frozen)
        self.n, self.h = n, h
        # The teacher's projection, once set; None until then (only for students that read the teacher).
        self.teacher_space: Optional[tuple[np.ndarray, np.ndarray]] = None
        # Only predictions (no gradient) may run in bfloat16: on a 2-core AMX CPU that halved a
        # population's prediction, but made the training steps 24% slower (backward kernels).
        self.autocast = resolve_dtype(config.student.precision, self.lm.device) == "bfloat16"
        self.autocast_training = False  # set only to measure it (benchmarks/student_step.py)

    def set_prompt_space(self, A: np.ndarray, P0: np.ndarray) -> None:
        """Start from the teacher's projection ``P(z) = P0 + A z``; only a student cut from the teacher reads it."""
        if not self.spec.reads_teacher:
            return
        A, P0 = np.asarray(A, np.float32), np.asarray(P0, np.float32).reshape(self.n, self.h)
        if A.shape != tuple(self.A.shape):
            raise ValueError(f"The teacher's projection has shape {A.shape}, but this student reads {tuple(self.A.shape)}.")
        with torch.no_grad():
            self.A.copy_(host_tensor(A, self.lm.device))
            self.P0.copy_(host_tensor(P0, self.lm.device))
        self.teacher_space = (A, P0)

    def forward(self, z: torch.Tensor, rows: np.ndarray, split: str) -> torch.Tensor:
        """Logits (R, C) for per-row z (R, d) on example ``rows`` of ``split``."""
        if self.spec.reads_teacher and self.teacher_space is None:
            raise RuntimeError(f"Student {self.spec.kind!r} reads the teacher's prompt space, which it was not given: "
                               "call set_prompt_space(A, P0) with the run's space first.")
        prompts = self.P0.unsqueeze(0) + (z @ self.A).view(-1, self.n, self.h)
        fast = self.autocast and (self.autocast_training or not torch.is_grad_enabled())
        with torch.autocast(self.lm.device.type, dtype=torch.bfloat16, enabled=fast):
            return self.lm(prompts, rows, split).float() + z @ self.U


class StudentTrainer:
    """Holds the student and its optimizer; every method takes and returns plain arrays."""

    def __init__(self, config: GDFOConfig, data: TaskData):
        set_threads(config.pool.torch_threads)
        torch.manual_seed(config.seeds.torch)
        self.config = config.student
        self.loss_name = config.search.loss or data.spec.loss
        self.model = StudentModel(config, data)
        # Dropout stays off: it would draw from torch's global generator, so a resumed run
        # would not replay the uninterrupted one, and it only adds noise to distillation.
        self.model.eval()
        self.device = self.model.lm.device
        self.train_labels = host_tensor(data.train.label, self.device)
        self.n_train = len(data.train)
        projection = [p for p in (self.model.A, self.model.P0, self.model.U) if p.requires_grad]
        rest = [p for name, p in self.model.named_parameters() if p.requires_grad and name not in ("A", "P0", "U")]
        self.params = projection + rest
        # The oracle trains nothing: its steps are skipped and its KD loss reported as NaN.
        self.optimizer = torch.optim.Adam([
            {"params": projection, "lr": config.student.projection_lr},
            {"params": rest, "lr": config.student.lr},
        ]) if self.params else None
        # oracle:S: the noise's length is the first population's scale (sigma0 sqrt(d)). Its amplitude follows the
        # search: each population the student ranks sets it to S times the oracle's spread there over the field's, so
        # the faithfulness holds as the search narrows and the fitness flattens (a fixed amplitude let the noise
        # swamp the oracle within ten generations). Before any population, probes drawn as the first one is set it.
        spec, d = self.model.spec, config.prompt.intrinsic_dim
        self.noise = SmoothField(d, config.search.sigma0 * np.sqrt(d), config.seeds.student_init,
                                 device=self.device) if spec.noisy else None
        self.noise_scale: Optional[float] = None
        self._probes = config.search.sigma0 * np.random.default_rng(config.seeds.student_init).standard_normal(
            (config.search.resolved_popsize(d), d)) if self.noise is not None else None

    def set_prompt_space(self, A: np.ndarray, P0: np.ndarray) -> None:
        """The run's (teacher's) prompt space; only students cut from the teacher read it."""
        self.model.set_prompt_space(A, P0)

    def observe(self, Z: np.ndarray, logits: np.ndarray, rows: np.ndarray) -> None:
        """A network student learns from replayed batches (:meth:`train_steps`), not from each population."""

    def _z(self, z: np.ndarray) -> torch.Tensor:
        return host_tensor(z, self.device, torch.float32)

    def _loss(self, batch: DistillBatch) -> torch.Tensor:
        logits = self.model(self._z(batch.z), batch.rows, "train")
        loss = kd_loss(logits, host_tensor(batch.teacher, self.device), host_tensor(batch.labels, self.device),
                       self.config.tau, self.config.beta)
        if self.config.rank_weight > 0 and batch.pop_z is not None:
            predicted = self._population_fitness(self._z(batch.pop_z), batch.pop_rows)
            target = host_tensor(batch.pop_fitness, self.device, predicted.dtype)
            loss = loss + self.config.rank_weight * pairwise_rank_loss(predicted, target)
        return loss

    def _exact_fitness(self, Z: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        k, b = Z.shape[0], len(rows)
        logits = self.model(Z.repeat_interleave(b, dim=0), np.tile(rows, k), "train").view(k, b, -1)
        labels = self.train_labels[host_tensor(rows, self.device)].expand(k, -1)
        return task_loss(logits, labels, self.loss_name)

    def _population_fitness(self, Z: torch.Tensor, rows: np.ndarray, rescale: bool = False) -> torch.Tensor:
        """Fitness of candidates ``Z``; oracle:S's noise is first rescaled to ``Z`` when ``rescale``."""
        fitness = self._exact_fitness(Z, rows)
        if self.noise is None:
            return fitness
        if rescale:
            self._rescale_noise(Z, fitness)
        elif self.noise_scale is None:
            with torch.no_grad():
                probes = self._z(self._probes)
                self._rescale_noise(probes, self._exact_fitness(probes, np.arange(self.n_train)))
        return fitness + self.noise_scale * self.noise(Z)

    def _rescale_noise(self, Z: torch.Tensor, exact: torch.Tensor) -> None:
        """oracle:S's amplitude: S times the oracle's spread ``exact`` over the population ``Z``, over the field's."""
        field = self.noise(Z).std().item()
        if field > 0:
            self.noise_scale = self.model.spec.noise * exact.std().item() / field
        elif self.noise_scale is None:  # a population of one point repeated: nothing to scale to
            self.noise_scale = 0.0

    def compute_grads(self, batch: DistillBatch) -> tuple[float, list[np.ndarray]]:
        """Loss and gradients of one shard (data-parallel workers average these)."""
        if self.optimizer is None:
            return float("nan"), []
        self.optimizer.zero_grad(set_to_none=False)
        loss = self._loss(batch)
        loss.backward()
        return loss.item(), [p.grad.detach().cpu().numpy().copy() for p in self.params]

    def apply_grads(self, grads: list[np.ndarray]) -> None:
        if self.optimizer is None:
            return
        for p, g in zip(self.params, grads):
            p.grad = host_tensor(g, self.device)
        self.optimizer.step()

    def train_steps(self, batches: list[DistillBatch]) -> float:
        """K steps on one worker; returns the mean KD loss."""
        if self.optimizer is None:
            return float("nan")
        losses = []
        for batch in batches:
            loss, grads = self.compute_grads(batch)
            self.apply_grads(grads)
            losses.append(loss)
        return float(np.mean(losses)) if losses else float("nan")

    def predict_fitness(self, Z: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """The student's fitness of each candidate on train ``rows`` (default: all), for fidelity.

        oracle:S first rescales its noise to this population (its ``noise_scale``, which the next
        gradient uses too): every population the search asks about is one it ranks with the same faithfulness.
        """
        rows = np.arange(self.n_train) if rows is None else np.asarray(rows)
        with torch.no_grad():
            return self._population_fitness(self._z(Z), rows, rescale=len(Z) > 1).cpu().numpy()

    def grad_z(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """Task loss at z on the train batch and its gradient in z (docs/method.md step 5's g)."""
        zt = self._z(z).reshape(1, -1).requires_grad_(True)
        loss = self._population_fitness(zt, np.arange(self.n_train))[0]
        (g,) = torch.autograd.grad(loss, zt)
        return loss.item(), g[0].cpu().numpy()

    def predict(self, z: np.ndarray, split: str, rows: np.ndarray) -> np.ndarray:
        zt = self._z(z).reshape(1, -1).expand(len(rows), -1)
        with torch.no_grad():
            return self.model(zt, np.asarray(rows), split).cpu().numpy()

    def state(self) -> dict:
        """Trainable weights and optimizer state (a frozen body is rebuilt from the model id)."""
        weights = {k: v.detach().cpu().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        # A copy: state_dict() shares Adam's moment tensors, which the next step changes in place. A
        # snapshot taken before an overlapped distillation would otherwise change while it runs.
        optimizer = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        # The teacher's projection travels with the weights: a restarted worker of a student that keeps it
        # frozen (the oracle) has it in no weight.
        return {"model": weights, "optimizer": optimizer, "prompt_space": self.model.teacher_space,
                "noise_scale": self.noise_scale}

    def load_state(self, state: dict) -> None:
        missing = set(state["model"]) - {k for k, v in self.model.named_parameters() if v.requires_grad}
        if missing:
            raise ValueError(f"Student checkpoint has weights this student does not train: {sorted(missing)}.")
        if state.get("prompt_space") is not None:
            self.model.set_prompt_space(*state["prompt_space"])
        self.noise_scale = state.get("noise_scale")
        self.model.load_state_dict(state["model"], strict=False)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


class GPStudent:
    """A student with no network: a Gaussian process on the per-example logits of the paid answers.

    Every (train example, class) logit is a GP in z with one RBF kernel: length scale
    ``student.gp_scale`` times the median distance between the answered candidates, noise
    ``student.gp_nugget``, prior mean the answers' average. The posterior mean predicts a
    population's logits, and its gradient is gdfo's g. It models the train batch alone, so it
    has no test score of its own. The best forecaster of the fidelity study
    (benchmarks/results/fidelity-2026-12-04), here as a student.
    """

    def __init__(self, config: GDFOConfig, data: TaskData):
        self.loss_name = config.search.loss or data.spec.loss
        self.labels = np.asarray(data.train.label)
        self.scale, self.nugget = config.student.gp_scale, config.student.gp_nugget
        self.capacity = config.student.buffer_candidates
        self.X = np.zeros((0, config.prompt.intrinsic_dim))
        self.Y = np.zeros((0, len(self.labels), data.spec.n_classes))
        self._fit: Optional[tuple] = None  # (ell2, mean, alpha) for the current answers

    def observe(self, Z: np.ndarray, logits: np.ndarray, rows: np.ndarray) -> None:
        """Add a population's answers (on every train row, in order); the newest ``buffer_candidates`` stay."""
        if not np.array_equal(np.asarray(rows), np.arange(len(self.labels))):
            raise ValueError("The GP student models the whole train batch: its answers must cover every train row.")
        self.X = np.vstack([self.X, np.asarray(Z, np.float64)])[-self.capacity:]
        self.Y = np.concatenate([self.Y, np.asarray(logits, np.float64)])[-self.capacity:]
        self._fit = None

    def _fitted(self) -> Optional[tuple]:
        if self._fit is None and len(self.X) >= 2:
            X = self.X
            d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
            median = float(np.median(np.sqrt(d2[np.triu_indices(len(X), 1)])))
            ell2 = (self.scale * median) ** 2 if median > 0 else 1.0
            K = np.exp(-d2 / (2 * ell2)) + self.nugget * np.eye(len(X))
            flat = self.Y.reshape(len(X), -1)
            mean = flat.mean(0)
            self._fit = (ell2, mean, np.linalg.solve(K, flat - mean))
        return self._fit

    def _logits(self, Z: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Posterior mean logits (k, len(rows), C) at candidates ``Z`` (k, d); the prior (zeros) before two answers."""
        shape = self.Y.shape[1:]
        fit = self._fitted()
        if fit is None:
            return torch.zeros((Z.shape[0], len(rows), shape[1]), dtype=torch.float64) + Z.sum() * 0.0
        ell2, mean, alpha = fit
        X = torch.as_tensor(self.X)
        k = torch.exp(-((Z[:, None, :] - X[None]) ** 2).sum(-1) / (2 * ell2))
        flat = torch.as_tensor(mean) + k @ torch.as_tensor(alpha)
        return flat.view(Z.shape[0], *shape)[:, torch.tensor(np.asarray(rows))]

    def _fitness(self, Z: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        labels = torch.as_tensor(self.labels[np.asarray(rows)]).expand(Z.shape[0], -1)
        return task_loss(self._logits(Z, rows), labels, self.loss_name)

    def predict_fitness(self, Z: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows)
        with torch.no_grad():
            # A copy: a population that came through Ray's object store is read-only, and torch warns on it.
            return self._fitness(torch.tensor(np.asarray(Z, np.float64)), rows).numpy()

    def grad_z(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        zt = torch.tensor(np.asarray(z, np.float64)).reshape(1, -1).requires_grad_(True)
        loss = self._fitness(zt, np.arange(len(self.labels)))[0]
        (g,) = torch.autograd.grad(loss, zt)
        return loss.item(), g[0].numpy().astype(np.float32)

    def predict(self, z: np.ndarray, split: str, rows: np.ndarray) -> Optional[np.ndarray]:
        """Logits on train rows; None elsewhere (the GP knows the teacher's answers on train alone)."""
        if split != "train":
            return None
        with torch.no_grad():
            return self._logits(torch.tensor(np.asarray(z, np.float64)).reshape(1, -1), rows)[0].numpy()

    def set_prompt_space(self, A: np.ndarray, P0: np.ndarray) -> None:
        """The GP works in z itself."""

    def train_steps(self, batches: list) -> float:
        return float("nan")  # nothing to train: observe() is its fit

    def compute_grads(self, batch: DistillBatch) -> tuple[float, list]:
        return float("nan"), []

    def apply_grads(self, grads: list) -> None:
        pass

    def state(self) -> dict:
        return {"X": self.X.copy(), "Y": self.Y.copy()}

    def load_state(self, state: dict) -> None:
        self.X, self.Y, self._fit = np.asarray(state["X"]), np.asarray(state["Y"]), None


def make_student(config: GDFOConfig, data: TaskData) -> "StudentTrainer | GPStudent":
    """The student ``model.student`` names (:class:`~gdfo_ray.config.StudentSpec`), for one worker."""
    if config.model.student_spec.kind == "gp":
        return GPStudent(config, data)
    return StudentTrainer(config, data)
