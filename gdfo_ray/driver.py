"""The generation loop, shared by every method, with the pools injected (no Ray here).

The driver owns what must stay central: the budget (charged before dispatch),
the replay buffer, the best-so-far prompt, dev evaluation and the history.
Hooks receive each history row (progress display, checkpointing).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from gdfo_ray.budget import CallBudget
from gdfo_ray.config import GDFOConfig
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.metrics import fitness, metric, spearman
from gdfo_ray.methods import BaseMethod, make_method
from gdfo_ray.prompt import PromptSpace
from gdfo_ray.replay import ReplayBuffer
from gdfo_ray.tasks import TaskData


@dataclass
class DriverState:
    """Everything a resumed run needs besides the student's weights; pickled every generation."""

    method: BaseMethod
    budget: CallBudget
    buffer: ReplayBuffer
    rng: np.random.Generator
    generation: int = 0
    history: list = field(default_factory=list)
    best_train: tuple = (None, float("inf"))  # (z, train fitness)
    best_dev: tuple = (None, -float("inf"), float("inf"))  # (z, dev score, dev loss)
    evaluated: tuple = (None, None)  # (z, dev score) of the last dev evaluation
    last_eval_calls: int = 0
    np_global_state: tuple = ()  # pycma samples from numpy's global generator
    pending_distill: Optional[list] = None  # batches of a distillation still running (student.overlap_distill)
    # The replay batches' own generator (seeds.replay); the Driver sets it to ``rng`` for a checkpoint from before it.
    replay_rng: Optional[np.random.Generator] = None
    run_id: str = ""  # names the run's calls to a service (Driver.query); kept across a resume


def call_ids(run_id: str, prompts: np.ndarray, split: str, rows: np.ndarray) -> list[str]:
    """One id per prompt, from the run, the split, the rows and the prompt's bytes: the same question is the
    same call, and a different one can never reuse an id (a service refuses a key sent with another body).

    >>> a = call_ids("r1", np.zeros((2, 1, 2)), "train", np.arange(3))
    >>> a[0] == a[1], a[0] == call_ids("r1", np.ones((1, 1, 2)), "train", np.arange(3))[0], a[0][:9]
    (True, False, 'r1-train-')
    """
    rows_digest = hashlib.sha256(np.ascontiguousarray(rows, np.int64).tobytes()).hexdigest()[:8]
    return [f"{run_id}-{split}-{rows_digest}-"
            f"{hashlib.sha256(np.ascontiguousarray(p, np.float32).tobytes()).hexdigest()[:24]}" for p in prompts]


class GenerationContext:
    """What a method may do in one generation: evaluate candidates, distill, ask the student."""

    def __init__(self, driver: "Driver"):
        self._driver = driver
        self.rng = driver.state.rng
        self.timings = {"teacher_s": 0.0, "student_s": 0.0, "optimizer_s": 0.0}
        self.student = _LaneProxy(self) if driver.lane is not None else None
        self.fitness: list[np.ndarray] = []  # every fitness the teacher paid for this generation
        self.overlap_distill = driver.config.student.overlap_distill

    def predict_async(self, Z: np.ndarray) -> Future:
        """Start the student's prediction of a population's fitness on the fidelity rows."""
        return self.student_async("predict_fitness", Z, self._driver.fidelity_rows)

    def fidelity(self, predicted: np.ndarray, logits: np.ndarray) -> float:
        """Spearman of the student's predicted against the teacher's fitness, on the same rows."""
        d = self._driver
        rows = d.fidelity_rows
        return spearman(predicted, fitness(logits[:, rows], d.data.train.label[rows], d.loss))

    def student_async(self, method: str, *args) -> Future:
        """Start a student call and return at once; calls run in the order they were started."""
        return self._driver.lane.submit(method, *args)

    def wait_student(self, future: Future):
        """The result of a started student call; the time spent waiting counts as student time."""
        t0 = time.perf_counter()
        try:
            return future.result()
        finally:
            self.timings["student_s"] += time.perf_counter() - t0

    @contextlib.contextmanager
    def timed(self, key: str):
        """Adds the block's wall time to ``timings[key]`` (the optimizer's own work, say)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] += time.perf_counter() - t0

    def evaluate(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Charge ``len(Z)`` calls, query the teacher on the train batch, return (fitness, logits)."""
        d = self._driver
        d.state.budget.charge(len(Z))
        t0 = time.perf_counter()
        logits = d.query(d.space.project(Z), "train", d.train_ids)
        self.timings["teacher_s"] += time.perf_counter() - t0
        check_logits(logits, (len(Z), len(d.train_ids), d.data.spec.n_classes))
        F = fitness(logits, d.data.train.label, d.loss)
        d.note_candidates(Z, F)
        self.fitness.append(F)
        return F, logits

    def loss_and_grad(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        """One white-box call: the teacher's loss at z and its gradient in z (chain rule through A)."""
        d = self._driver
        d.state.budget.charge(1)
        t0 = time.perf_counter()
        loss, grad_p = d.teacher.loss_and_grad(d.space.project(z)[0], "train", d.train_ids,
                                               d.data.train.label, d.loss)
        self.timings["teacher_s"] += time.perf_counter() - t0
        if not np.isfinite(loss):
            raise TeacherError(f"The teacher returned a non-finite loss {loss} at generation {d.state.generation}.")
        d.note_candidates(z[None], np.asarray([loss]))
        self.fitness.append(np.asarray([loss]))
        return loss, d.space.A @ np.asarray(grad_p, dtype=np.float32).reshape(-1)

    def _batches(self, Z: np.ndarray, logits: np.ndarray, F: np.ndarray) -> list:
        d = self._driver
        d.state.buffer.add(Z, logits, d.train_ids, F)
        self.student.observe(Z, logits, d.train_ids)  # a GP student fits on whole populations
        cfg = d.config.student
        pop_rows = min(8, len(d.train_ids)) if cfg.rank_weight > 0 else 0
        return [d.state.buffer.sample(cfg.batch_rows, d.state.replay_rng, d.data.train.label, pop_rows)
                for _ in range(cfg.k_steps)]

    def distill(self, Z: np.ndarray, logits: np.ndarray, F: np.ndarray) -> float:
        """Store the paid answers and take K student steps on the replay buffer (no calls)."""
        batches = self._batches(Z, logits, F)
        return self.student.distill(batches) if batches else float("nan")

    def distill_later(self, Z: np.ndarray, logits: np.ndarray, F: np.ndarray) -> None:
        """As :meth:`distill`, but left running while the next generation queries the teacher.

        The student's weights before these steps are kept for the checkpoint, with the
        steps' batches, so that a resumed run replays them (see :meth:`Driver.student_checkpoint`).
        """
        d = self._driver
        batches = self._batches(Z, logits, F)
        if batches:
            d.start_pending_distill(batches, self.student.state())

    def previous_distill_loss(self) -> float:
        """The KD loss of the steps :meth:`distill_later` started one generation ago (waits for them)."""
        d = self._driver
        if d.pending is None:
            return float("nan")
        loss = self.wait_student(d.pending[0])
        d.pending, d.state.pending_distill = None, None
        return loss


class StudentLane:
    """The student's calls, one at a time and in order, on a thread of the driver.

    The driver may leave a call in flight (the student predicting a population, or
    distilling the last one) while it waits on the teacher; a later call queues
    behind it, so the order, and with it the result, is that of a sequential run.
    A student that computes in this process (``in_process``) shares the teacher's
    cores, so its calls run at once, in place, rather than beside the teacher's
    forward: on 2 cores the overlap made each teacher call 20% slower.
    """

    def __init__(self, student):
        self.student = student
        self._executor = None
        if not getattr(student, "in_process", False):
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="gdfo-student")

    def submit(self, method: str, *args) -> Future:
        if self._executor is not None:
            return self._executor.submit(getattr(self.student, method), *args)
        done: Future = Future()
        try:
            done.set_result(getattr(self.student, method)(*args))
        except Exception as error:  # handed to the caller, as the thread's future would
            done.set_exception(error)
        return done

    def call(self, method: str, *args):
        return self.submit(method, *args).result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


class _LaneProxy:
    """``ctx.student.<method>(...)``: a student call through the lane, its wait counted as student time."""

    def __init__(self, ctx: GenerationContext):
        self._ctx = ctx

    def __getattr__(self, name: str):
        return lambda *args: self._ctx.wait_student(self._ctx.student_async(name, *args))


def check_logits(logits: np.ndarray, shape: tuple) -> None:
    """Refuse unusable teacher answers, naming the candidate (pycma would hide NaN as the median)."""
    if logits.shape != shape:
        raise TeacherError(f"The teacher returned logits of shape {logits.shape}, expected {shape}.")
    bad = ~np.isfinite(logits).all(axis=tuple(range(1, logits.ndim)))
    if bad.any():
        raise TeacherError(
            f"The teacher returned NaN/inf logits for candidate(s) {np.flatnonzero(bad).tolist()}; "
            "the run stops rather than score them. Check the teacher service or lower search.sigma0."
        )


def _fitness_stats(paid: list) -> dict:
    if not paid:
        return {}
    F = np.concatenate(paid)
    return {"fitness_min": float(F.min()), "fitness_mean": float(F.mean())}


class Driver:
    """Runs generations until the budget cannot pay for another one.

    Args:
        config: the run's configuration.
        data: the task's splits.
        teacher: anything with ``query`` (and ``loss_and_grad`` for white_box): a pool or a teacher.
        student: a :class:`~gdfo_ray.student.StudentGroup` for kd and gdfo, else None.
        space: the teacher's prompt space.
        state: a resumed state, or None to start fresh.
        hooks: called with (driver, history row) after every generation.
        reserve_calls: asked ``reserve_calls(calls)`` before each generation; False ends the
            run. A budget shared beyond this run (Tune trials querying one service) reserves
            the calls here, before they are dispatched.
    """

    def __init__(self, config: GDFOConfig, data: TaskData, teacher, student, space: PromptSpace,
                 state: Optional[DriverState] = None, hooks: tuple[Callable, ...] = (),
                 reserve_calls: Optional[Callable[[int], bool]] = None):
        self.config, self.data, self.teacher, self.student, self.space = config, data, teacher, student, space
        self.loss = config.search.loss or data.spec.loss
        self.train_ids = np.arange(len(data.train))
        # Its own generator: drawing these rows leaves the run's stream (and so its results) unchanged.
        n_fid = min(config.student.fidelity_rows, len(data.train))
        self.fidelity_rows = np.sort(np.random.default_rng(config.seeds.fidelity_rows).choice(len(data.train), n_fid,
                                                                                     replace=False))
        self.hooks = list(hooks)
        self.reserve_calls = reserve_calls
        self.teacher_info = None  # what the teacher's describe() said, where the run builder asked it
        if state is None:
            state = DriverState(make_method(config, getattr(space, "n_layers", 1)), CallBudget(config.search.budget_calls),
                                ReplayBuffer(config.student.buffer_candidates), np.random.default_rng(config.seeds.run),
                                replay_rng=np.random.default_rng(config.seeds.replay))
        else:
            if state.np_global_state:
                np.random.set_state(state.np_global_state)
            if state.replay_rng is None:  # a checkpoint from before seeds.replay drew its batches from the run's stream
                state.replay_rng = state.rng
        if not state.run_id:  # a new run, or a checkpoint from before runs named their calls
            state.run_id = uuid.uuid4().hex
        self.state = state
        self.lane = StudentLane(student) if student is not None else None
        self.pending: Optional[tuple] = None  # (future of a running distillation, the weights before it)
        if state.pending_distill and self.lane is not None:  # resumed: replay the steps the checkpoint left
            self.start_pending_distill(state.pending_distill, self.lane.call("state"))

    def start_pending_distill(self, batches: list, weights_before: dict) -> None:
        self.state.pending_distill = batches
        self.pending = (self.lane.submit("distill", batches), weights_before)

    def student_checkpoint(self) -> Optional[dict]:
        """The student's state that matches ``self.state`` (before a distillation still running)."""
        if self.lane is None:
            return None
        return self.pending[1] if self.pending is not None else self.lane.call("state")

    def drain(self) -> None:
        """Wait for the student's last steps (before scoring it or saving it)."""
        if self.pending is not None:
            self.pending[0].result()
            self.pending, self.state.pending_distill = None, None

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()

    def note_candidates(self, Z: np.ndarray, F: np.ndarray) -> None:
        i = int(np.argmin(F))
        if F[i] < self.state.best_train[1]:
            self.state.best_train = (np.array(Z[i], dtype=np.float64), float(F[i]))

    def run(self) -> DriverState:
        s = self.state
        while s.method.calls_per_generation and s.budget.can_afford(s.method.calls_per_generation):
            if self.reserve_calls is not None and not self.reserve_calls(s.method.calls_per_generation):
                break
            t0 = time.perf_counter()
            ctx = GenerationContext(self)
            info = s.method.step(ctx)
            s.generation += 1
            t_eval = time.perf_counter()
            dev = self.maybe_evaluate(final=not s.budget.can_afford(s.method.calls_per_generation))
            row = {"generation": s.generation, "calls": s.budget.spent, "dev_calls": s.budget.dev_calls,
                   "fitness_best": s.best_train[1], **_fitness_stats(ctx.fitness), **dev, **info,
                   **ctx.timings, "eval_s": time.perf_counter() - t_eval, "step_s": time.perf_counter() - t0}
            # What is left is orchestration: the driver's bookkeeping and moving data to and from the pools.
            row["other_s"] = (row["step_s"] - row["teacher_s"] - row["student_s"] - row["optimizer_s"]
                              - row["eval_s"])
            s.history.append(row)
            s.np_global_state = np.random.get_state()
            for hook in self.hooks:
                hook(self, row)
        self.drain()
        return s

    def maybe_evaluate(self, final: bool) -> dict:
        """Every E calls (and at the end), score the best-so-far z on dev unless already scored."""
        s = self.state
        due = s.budget.spent - s.last_eval_calls >= self.config.search.eval_every_calls
        z = s.best_train[0]
        if z is None or not (due or final):
            return {}
        s.last_eval_calls = s.budget.spent
        if s.evaluated[0] is not None and np.array_equal(z, s.evaluated[0]):
            return {"dev_score": s.evaluated[1]}  # same prompt, same score: no call
        score, loss = self.evaluate_prompt(z, "dev")
        s.budget.dev_calls += 1
        s.evaluated = (z, score)
        if (score, -loss) > (s.best_dev[1], -s.best_dev[2]):
            s.best_dev = (z, score, loss)
        return {"dev_score": score, "dev_loss": loss}

    def query(self, prompts: np.ndarray, split: str, rows: np.ndarray) -> np.ndarray:
        """The teacher's logits; a service's calls are named by what they ask (:func:`call_ids`), so a call
        asked again, by a generation repeated after a crash, is answered from its idempotency cache, unbilled."""
        if not self.config.model.teacher_is_service:
            return np.asarray(self.teacher.query(prompts, split, rows))
        return np.asarray(self.teacher.query(prompts, split, rows, call_ids(self.state.run_id, prompts, split, rows)))

    def evaluate_prompt(self, z: Optional[np.ndarray], split: str) -> tuple[float, float]:
        """(metric, loss) of a prompt on a whole split; ``z=None`` is the manual prompt (no tokens)."""
        score, loss, _ = self.score_prompt(z, split)
        return score, loss

    def score_prompt(self, z: Optional[np.ndarray], split: str) -> tuple[float, float, np.ndarray]:
        """(metric, loss, predicted class per row) of a prompt on a whole split (one call)."""
        data = self.data.split(split)
        prompts = (np.zeros((1, 0, self.space.spec.hidden_size), np.float32) if z is None
                   else self.space.project(z))
        logits = self.query(prompts, split, np.arange(len(data)))
        check_logits(logits, (1, len(data), self.data.spec.n_classes))
        return (metric(logits[0], data.label, self.data.spec.metric), float(fitness(logits, data.label, self.loss)[0]),
                logits[0].argmax(-1))

    @property
    def best_z(self) -> Optional[np.ndarray]:
        """The prompt kept: best on dev (docs/method.md step 6); None for the manual method."""
        return self.state.best_dev[0] if self.state.best_dev[0] is not None else self.state.best_train[0]
