"""The compared methods, each one ``step`` of the same driver loop (docs/method.md, Methods).

A method proposes candidates and learns from their fitness; it never calls the
teacher itself but goes through a :class:`StepContext`, which the driver provides:
it charges the budget before dispatch and keeps the best-so-far prompt.
"""

from __future__ import annotations

import abc
import warnings
from concurrent.futures import Future
from typing import Any, ContextManager, Optional, Protocol

import numpy as np

from gdfo_ray.config import GDFOConfig
from gdfo_ray.harmonize import gradient_basis, gradient_step, guided_samples, harmonize


class StepContext(Protocol):
    """What a method may do in one generation (:class:`gdfo_ray.driver.GenerationContext` provides it)."""

    rng: np.random.Generator  # the run's generator
    student: Any  # the student's calls (``grad_z``, ``state``...), each waited for; None without a student
    overlap_distill: bool

    def evaluate(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Charge ``len(Z)`` calls and return the teacher's (fitness, logits) on the train batch."""

    def loss_and_grad(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """One white-box call: the teacher's loss at z and its gradient in z."""

    def predict_async(self, Z: np.ndarray) -> Future:
        """Start the student's prediction of a population's fitness."""

    def wait_student(self, future: Future) -> Any:
        """The result of a started student call."""

    def fidelity(self, predicted: np.ndarray, logits: np.ndarray) -> float:
        """Spearman of the student's predicted against the teacher's fitness."""

    def distill(self, Z: np.ndarray, logits: np.ndarray, F: np.ndarray) -> float:
        """Store the paid answers and take the student's K steps; returns the KD loss."""

    def distill_later(self, Z: np.ndarray, logits: np.ndarray, F: np.ndarray) -> None:
        """As :meth:`distill`, left running while the next generation queries the teacher."""

    def previous_distill_loss(self) -> float:
        """The KD loss of the steps :meth:`distill_later` started one generation ago."""

    def timed(self, key: str) -> ContextManager:
        """Adds the block's wall time to the generation's timing ``key``."""


def _import_cma():
    with warnings.catch_warnings():  # cma warns that its optional plotting backend is missing
        warnings.filterwarnings("ignore", message="Could not import matplotlib")
        import cma
    return cma


def make_es(config: GDFOConfig, seed: int, **extra):
    """A CMA-ES on d dimensions from 0 with sigma0, run until the budget ends it (no stopping rule)."""
    cma = _import_cma()
    options = {"popsize": config.popsize, "seed": seed, "verbose": -9, "maxiter": 10**9, "tolfun": 0, "tolx": 0,
               "tolstagnation": 10**9, **extra, **config.search.cma_options}
    return cma.CMAEvolutionStrategy(np.zeros(config.prompt.intrinsic_dim), config.search.sigma0, options)


class BaseMethod(abc.ABC):
    name: str = ""
    calls_per_generation: int = 0

    @abc.abstractmethod
    def step(self, ctx: StepContext) -> dict:
        """Run one generation; returns its method-specific diagnostics for the history row."""


class Manual(BaseMethod):
    """The template and verbalizer alone: no prompt tokens, no calls."""

    name = "manual"

    def step(self, ctx: StepContext) -> dict:  # never called: 0 calls per generation
        raise RuntimeError("The manual method has no generations.")


class BBT(BaseMethod):
    """CMA-ES on z (Sun et al., 2022)."""

    name = "bbt"

    def __init__(self, config: GDFOConfig):
        self.d = config.prompt.intrinsic_dim
        self.calls_per_generation = config.popsize
        self.es = make_es(config, config.seeds.cma)

    def _ask_tell(self, ctx: StepContext, predict: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        with ctx.timed("optimizer_s"):
            Z = np.asarray(self.es.ask())
        predicting = ctx.predict_async(Z) if predict else None  # runs while the teacher does
        F, logits = ctx.evaluate(Z)
        info = {"sigma": float(self.es.sigma)}
        if predict:
            info["fidelity"] = ctx.fidelity(ctx.wait_student(predicting), logits)
            # With overlap, the steps on this generation's answers start after the gradient (see GDFO.step);
            # the row reports the loss of the previous generation's steps.
            info["kd_loss"] = ctx.previous_distill_loss() if ctx.overlap_distill else ctx.distill(Z, logits, F)
        with ctx.timed("optimizer_s"):
            self.es.tell(list(Z), F.tolist())
        return Z, F, logits, info

    def step(self, ctx: StepContext) -> dict:
        return self._ask_tell(ctx, predict=False)[3]


class BBTv2(BaseMethod):
    """Deep prompts, one z_l per layer, CMA-ES per layer in turns (Sun et al., EMNLP 2022).

    Generation t searches layer ``t mod L`` with that layer's own CMA-ES while the other
    layers stay at their current vectors. The current vector of a layer is the best
    candidate its searches found, kept only when it lowers the train loss of the whole
    prompt, so the prompt the turns share never gets worse. The budget counts every call
    of every layer, as for bbt.
    """

    name = "bbtv2"

    def __init__(self, config: GDFOConfig, n_layers: int):
        self.d, self.n_layers = config.prompt.intrinsic_dim, n_layers
        self.calls_per_generation = config.popsize
        self.z = np.zeros(n_layers * self.d)
        self.current_fitness = float("inf")
        self.turn = 0
        # One seed per layer, derived from the run's CMA-ES seed.
        self.es = [make_es(config, config.seeds.cma * 1000 + layer) for layer in range(n_layers)]

    def step(self, ctx: StepContext) -> dict:
        layer = self.turn % self.n_layers
        es, part = self.es[layer], slice(layer * self.d, (layer + 1) * self.d)
        with ctx.timed("optimizer_s"):
            Z_layer = np.asarray(es.ask())
            Z = np.repeat(self.z[None, :], len(Z_layer), axis=0)
            Z[:, part] = Z_layer
        F, _ = ctx.evaluate(Z)
        with ctx.timed("optimizer_s"):
            es.tell(list(Z_layer), F.tolist())
        best = int(np.argmin(F))
        if F[best] < self.current_fitness:
            self.z, self.current_fitness = Z[best].copy(), float(F[best])
        self.turn += 1
        return {"sigma": float(es.sigma), "layer": layer}


class GDFO(BBT):
    """CMA-ES plus the student's gradient candidates and the harmonized mean (docs/method.md, 1-5).

    One generation: the gradient candidates of the last one join CMA-ES's population; after
    tell, the mean may jump to a gradient candidate that beat every sample (``mean_to_best``);
    then the student's gradient at the mean gives the next candidates and the mean's move
    (:func:`~gdfo_ray.harmonize.harmonize`). ``warmup_steps`` generations of plain gradient
    steps, one call each, come first.
    """

    name = "gdfo"

    def __init__(self, config: GDFOConfig):
        super().__init__(config)
        self.h = config.harmonize
        self.z_gd: Optional[np.ndarray] = None  # (k, d): the gradient candidates of the next population
        self.popsize = config.popsize
        self.warmup = None  # [z, its loss, step length, steps left] while warming up
        self.eta_scale = 1.0  # the gradient candidates' step, in units of eta (harmonize.adapt_eta)
        self.grads: list = []  # the last harmonize.guided_k gradients, whose span guided samples favour
        self.z_guided: Optional[np.ndarray] = None  # (n, d): the guided samples of the next population
        self.n_guided = self.h.guided_in(self.popsize)  # checked against lambda with the config
        if self.h.warmup_steps:
            self.calls_per_generation = 1
            self.warmup = [np.zeros(self.d), float("inf"), self.h.eta * config.search.sigma0 * np.sqrt(self.d),
                           self.h.warmup_steps]

    def _direction(self, ctx: StepContext, z: np.ndarray) -> tuple[float, np.ndarray]:
        """The student's loss and gradient at z; with the random control, a random direction instead."""
        # With student.overlap_distill this gradient comes from a student one generation behind: its steps on
        # this generation's answers run during the next generation's teacher calls.
        loss, grad = ctx.student.grad_z(z)
        if self.h.control == "random":  # same step length, direction unrelated to the student
            grad = ctx.rng.normal(size=self.d)
        return loss, grad

    def _warmup_step(self, ctx: StepContext) -> dict:
        z, best, step, left = self.warmup
        loss, grad = self._direction(ctx, z)
        norm = float(np.linalg.norm(grad))
        candidate = z - step * grad / norm if norm > 0 else z.copy()
        F, logits = ctx.evaluate(candidate[None])
        accepted = bool(F[0] < best)
        if accepted:
            z, best, step = candidate, float(F[0]), step * 1.5
        else:
            step *= 0.5
        self.warmup = [z, best, step, left - 1]
        if left == 1:  # CMA-ES takes over from the best point of the warm-up
            self.es.mean = z.copy()
            self.warmup, self.calls_per_generation = None, self.popsize
        if ctx.overlap_distill:
            kd = ctx.previous_distill_loss()
            ctx.distill_later(candidate[None], logits, F)
        else:
            kd = ctx.distill(candidate[None], logits, F)
        return {"student_loss": loss, "warmup_accepted": float(accepted), "kd_loss": kd}

    def __setstate__(self, state: dict) -> None:
        # A checkpoint of a version with one gradient candidate and no warm-up.
        if state.get("z_gd") is not None and np.ndim(state["z_gd"]) == 1:
            state["z_gd"] = np.asarray(state["z_gd"])[None]
        state.setdefault("warmup", None)
        state.setdefault("popsize", state["calls_per_generation"])
        for key, value in (("eta_scale", 1.0), ("grads", []), ("z_guided", None), ("n_guided", 0)):
            state.setdefault(key, value)  # a checkpoint from before guided samples and the adaptive step
        self.__dict__.update(state)

    def step(self, ctx: StepContext) -> dict:
        if self.warmup is not None:
            return self._warmup_step(ctx)
        injected = 0 if self.z_gd is None else len(self.z_gd)
        guided = 0 if self.z_guided is None else len(self.z_guided)
        if injected or guided:
            # ask() returns injected solutions first, unchanged (force): the gradient candidates, then the guided ones.
            self.es.inject(list(self.z_gd if injected else []) + list(self.z_guided if guided else []), force=True)
        m_prev, sigma_before = self.es.mean.copy(), float(self.es.sigma)
        Z, F, logits, info = self._ask_tell(ctx, predict=True)
        jumped = False
        won = bool(injected) and float(F[:injected].min()) < float(F[injected:].min())
        if self.h.mean_to_best and won:
            self.es.mean, jumped = Z[int(np.argmin(F[:injected]))].copy(), True
        if self.h.adapt_eta and injected:
            self.eta_scale = min(16.0, self.eta_scale * 1.5) if won else max(1.0 / 16, self.eta_scale * 0.5)
        m_new = self.es.mean.copy()
        info["student_loss"], grad = self._direction(ctx, m_new)
        with ctx.timed("optimizer_s"):
            result = harmonize(m_prev, m_new, float(self.es.sigma), grad, self.h.eta * self.eta_scale, self.h.gamma,
                               self.h.gate, self.h.n_candidates)
            self.es.mean = result.m_next
            if self.h.keep_sigma and (jumped or result.weight > 0):
                self.es.sigma = max(float(self.es.sigma), sigma_before)
            if self.n_guided and self.h.gate != "off":
                self.grads = [*self.grads, grad][-self.h.guided_k:]
                basis = gradient_basis(self.grads, self.h.guided_k)
                self.z_guided = guided_samples(result.m_next, float(self.es.sigma), basis, self.h.guided_alpha,
                                               self.n_guided, ctx.rng)
        self.z_gd = result.candidates
        info["rho"] = result.rho
        info["z_gd_rank"] = int(1 + (F < F[:injected].min()).sum()) if injected else None
        info["mean_jumped"] = float(jumped) if self.h.mean_to_best else None
        if self.h.adapt_eta:
            info["eta_scale"] = self.eta_scale
        if guided:  # where the best guided sample ranked in its population
            info["guided_rank"] = int(1 + (F < F[injected:injected + guided].min()).sum())
        if ctx.overlap_distill:
            ctx.distill_later(Z, logits, F)
        return info


class LQCMA(BBT):
    """lq-CMA-ES: CMA-ES with pycma's linear-quadratic surrogate (``cma.fitness_models``, Hansen 2019).

    Each generation the surrogate ranks CMA-ES's population and the teacher answers only as
    many candidates, best-predicted first, as the surrogate needs to agree with it (Kendall
    tau >= 0.85); the others get the surrogate's values. The model's optimum is injected
    into the next population, as ``cma.fmin_lq_surr2`` does. A generation costs 1 to
    lambda calls, so a run ends once fewer than lambda calls are left: the peer of gdfo
    for a user who wants fewer calls and has no student.
    """

    name = "lq_cma"

    def __init__(self, config: GDFOConfig):
        super().__init__(config)  # lambda calls a generation at most; the budget is charged per call
        self.surrogate = _import_cma().fitness_models.SurrogatePopulation(None)

    def step(self, ctx: StepContext) -> dict:
        with ctx.timed("optimizer_s"):
            X = self.es.ask()
        paid = []

        def fitness(x: np.ndarray) -> float:
            F, _ = ctx.evaluate(np.asarray(x)[None])
            paid.append(float(F[0]))
            return paid[-1]

        self.surrogate.fitness = fitness
        try:
            values = self.surrogate(X)
        finally:
            self.surrogate.fitness = None
        with ctx.timed("optimizer_s"):
            self.es.tell(X, list(values))
            self.es.inject([self.surrogate.model.xopt])
        return {"sigma": float(self.es.sigma), "evaluated": len(paid)}

    def __getstate__(self) -> dict:
        # The surrogate's settings hold a lambda, which pickle refuses: keep its model and counters.
        state = dict(self.__dict__)
        sur = state.pop("surrogate")
        state["_surrogate"] = {"model": sur.model, "count": sur.count, "evaluations": sur.evaluations}
        return state

    def __setstate__(self, state: dict) -> None:
        saved = state.pop("_surrogate")
        self.__dict__.update(state)
        self.surrogate = _import_cma().fitness_models.SurrogatePopulation(None, model=saved["model"])
        self.surrogate.count, self.surrogate.evaluations = saved["count"], saved["evaluations"]


class KD(BaseMethod):
    """Ablation: the student alone moves z by its gradient; the teacher answers distillation queries."""

    name = "kd"

    def __init__(self, config: GDFOConfig):
        self.d = config.prompt.intrinsic_dim
        self.calls_per_generation = config.popsize
        self.sigma = config.search.sigma0
        self.eta = config.harmonize.eta
        self.z = np.zeros(self.d)

    def step(self, ctx: StepContext) -> dict:
        noise = ctx.rng.normal(size=(self.calls_per_generation - 1, self.d)) * self.sigma
        Z = np.vstack([self.z, self.z + noise])
        predicted = ctx.wait_student(ctx.predict_async(Z))
        F, logits = ctx.evaluate(Z)
        info = {"kd_loss": ctx.distill(Z, logits, F), "fidelity": ctx.fidelity(predicted, logits)}
        info["student_loss"], g = ctx.student.grad_z(self.z)
        self.z = gradient_step(self.z, g, self.eta * self.sigma * np.sqrt(self.d))  # the step harmonize takes
        return info


class WhiteBox(BaseMethod):
    """Reference ceiling: Adam on z through a local teacher's gradients (one call per step)."""

    name = "white_box"
    calls_per_generation = 1

    def __init__(self, config: GDFOConfig):
        d = config.prompt.intrinsic_dim
        self.z, self.m, self.v, self.t = np.zeros(d), np.zeros(d), np.zeros(d), 0
        self.lr = config.search.white_box_lr

    def step(self, ctx: StepContext) -> dict:
        loss, g = ctx.loss_and_grad(self.z)
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        self.z = self.z - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        return {"grad_norm": float(np.linalg.norm(g))}


def make_method(config: GDFOConfig, n_layers: int = 1) -> BaseMethod:
    """The method ``config.method``; ``n_layers`` is the prompt space's layer count (bbtv2)."""
    if config.method == "bbtv2":
        return BBTv2(config, n_layers)
    classes = {"manual": Manual, "bbt": BBT, "gdfo": GDFO, "kd": KD, "white_box": WhiteBox, "lq_cma": LQCMA}
    cls = classes[config.method]
    return cls() if cls is Manual else cls(config)
