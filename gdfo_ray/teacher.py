"""The black-box side: a teacher answers C logits per (prompt, example), nothing else.

:class:`BaseTeacher` is the whole interface a black box must offer. Two kinds
implement it: :class:`~gdfo_ray.local_teacher.LocalTeacher` runs an HF model
in-process, :class:`~gdfo_ray.http_teacher.HttpTeacher` calls a service.
:class:`TeacherPool` splits one request into pieces over several teachers and
reassembles them by index; its Ray twin in :mod:`gdfo_ray.distributed` only
changes how pieces are sent (and re-sends those lost with a dead actor).
This module needs neither torch nor Ray.
"""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from gdfo_ray.config import GDFOConfig
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.tasks import TaskData


@dataclass(frozen=True)
class TeacherInfo:
    """What the user side may know of a black box to build its prompt space."""

    model: str
    hidden_size: int
    embedding_std: float
    vocab_size: int
    n_classes: int
    dtype: str = "unknown"  # what the black box computes in, where it says
    # Deep prompts (bbtv2): the std of the hidden states entering each layer, for the scale of each
    # layer's projection. None: the black box takes input-embedding prompts only.
    layer_std: Optional[tuple] = None

    @property
    def deep_prompts(self) -> bool:
        return self.layer_std is not None


class BaseTeacher(abc.ABC):
    """A black box: prompt embeddings and example ids in, verbalizer logits out."""

    @abc.abstractmethod
    def describe(self) -> TeacherInfo:
        """Hidden size and embedding statistics, for A's scaling (BBT)."""

    @abc.abstractmethod
    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """Embeddings of vocabulary tokens, for P0 (``prompt.init="vocab"``)."""

    @abc.abstractmethod
    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        """Logits ``(k, B, C)`` of ``k`` prompts ``(k, n, h)`` on the examples ``example_ids`` of ``split``.

        Deep prompts (bbtv2) are ``(k, L, n, h)``: ``[:, 0]`` goes in at the input embeddings,
        ``[:, l]`` is added to the hidden states of the prompt tokens entering layer ``l``.
        Only a teacher whose :meth:`describe` gives ``layer_std`` takes them.

        ``call_ids`` name the ``k`` calls; a service uses them as idempotency keys, so
        a call sent again (a retry, or a re-query after an actor died) is billed once.
        """

    def check(self) -> None:
        """Raise :class:`TeacherError` now for what would fail a call later (a service's limits): a run
        checks before its first paid call. A local model or a recording has nothing to check."""

    def flops_per_call(self, split: str, example_ids: np.ndarray) -> Optional[float]:
        """Floating-point work of one prompt on these rows, done without waste (no padding), where the
        teacher runs here and can count it; None for a black box elsewhere."""
        return None

    def matmul_rate(self) -> Optional[float]:
        """FLOP/s of matrix products in the teacher's own process, dtype, device and threads: the rate its
        floor is read against, measured where the work runs (None for a black box elsewhere)."""
        return None

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        """Loss and its gradient in the prompt ``(n, h)``: only a local (white-box) teacher has it."""
        raise TeacherError(
            f"{type(self).__name__} is a black box and returns no gradients; method 'white_box' needs a "
            "local teacher (a model id or path)."
        )


def make_teacher(config: GDFOConfig, data: TaskData, token: Optional[str] = None, limiter: Any = None) -> BaseTeacher:
    """The teacher ``config.model.teacher`` names: a service for a URL, a recording of answers for a
    ``.npz`` file (:mod:`gdfo_ray.playback`), else a local model."""
    if config.model.teacher_is_recording:
        from gdfo_ray.playback import PlaybackTeacher

        return PlaybackTeacher(config.model.teacher, n_classes=data.spec.n_classes)
    if config.model.teacher_is_service:
        from gdfo_ray.http_teacher import HttpTeacher

        return HttpTeacher(config, data, token=token, limiter=limiter)
    from gdfo_ray.local_teacher import LocalTeacher

    return LocalTeacher(config, data)


class TeacherPool:
    """Splits a request into pieces over teachers and reassembles them by index.

    A service teacher gets one call per piece (its calls are what the service
    rate-limits and bills); a local teacher gets a share of the population in one
    forward, or a share of the examples when there is a single prompt (a dev score).
    Subclasses change :meth:`run_pieces`, the only place pieces are executed.

    Args:
        teachers: the teachers (or Ray actor handles, for the Ray twin).
        one_call_per_piece: send each candidate on its own (service teachers).
        slots_per_teacher: pieces one teacher works on at once.
    """

    def __init__(self, teachers: Sequence[Any], one_call_per_piece: bool = False, slots_per_teacher: int = 1):
        if not teachers:
            raise ValueError("A TeacherPool needs at least one teacher.")
        self.teachers = list(teachers)
        self.one_call_per_piece = one_call_per_piece
        self.slots_per_teacher = slots_per_teacher

    def __len__(self) -> int:
        return len(self.teachers)

    def run_pieces(self, method: str, pieces: list[tuple]) -> list:
        """``getattr(teacher, method)(*piece)`` for every piece, results in piece order."""
        return [getattr(self.teachers[i % len(self.teachers)], method)(*args) for i, args in enumerate(pieces)]

    def describe(self) -> TeacherInfo:
        return self.run_pieces("describe", [()])[0]

    def check(self) -> None:
        self.run_pieces("check", [()])  # every teacher holds the same task and talks to the same black box

    def flops_per_call(self, split: str, example_ids: np.ndarray) -> Optional[float]:
        return self.run_pieces("flops_per_call", [(split, example_ids)])[0]

    def matmul_rate(self) -> Optional[float]:
        return self.run_pieces("matmul_rate", [()])[0]

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self.run_pieces("embed_tokens", [(list(ids),)])[0]

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        k, slots = prompts.shape[0], len(self.teachers) * self.slots_per_teacher
        example_ids = np.asarray(example_ids)
        call_ids = list(call_ids) if call_ids is not None else [uuid.uuid4().hex for _ in range(k)]
        if self.one_call_per_piece or k >= slots or len(example_ids) < slots:
            n_pieces = k if self.one_call_per_piece else min(k, slots)
            parts = [p for p in np.array_split(np.arange(k), n_pieces) if len(p)]
            pieces = [(prompts[p], split, example_ids, [call_ids[i] for i in p]) for p in parts]
            return np.concatenate(self.run_pieces("query", pieces), axis=0)
        parts = [p for p in np.array_split(np.arange(len(example_ids)), slots) if len(p)]
        pieces = [(prompts, split, example_ids[p], call_ids) for p in parts]
        return np.concatenate(self.run_pieces("query", pieces), axis=1)

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        return self.run_pieces("loss_and_grad", [(prompt, split, example_ids, labels, loss)])[0]


class TeacherNotLoaded(TeacherError):
    """Raised by a teacher host that holds no task data yet (a restarted actor): give it the data first."""


class TeacherHost:
    """What a teacher-query actor runs: one teacher, built in the actor's process once it has the task data.

    It lives here, free of torch, so that an actor that only calls a service does not
    import it (a pool of 64 such actors stays small). The data comes through :meth:`load`
    rather than the constructor: an actor's constructor arguments must be small for Ray
    to restart it safely, and a restarted one answers :class:`TeacherNotLoaded` until the
    pool loads it again.
    """

    def __init__(self, config: GDFOConfig, token: Optional[str] = None, limiter: Any = None):
        self.config, self.token, self.limiter = config, token, limiter
        self.teacher: Optional[BaseTeacher] = None

    def load(self, data: TaskData) -> None:
        if self.teacher is None:
            self.teacher = make_teacher(self.config, data, token=self.token, limiter=self.limiter)

    def _loaded(self) -> BaseTeacher:
        if self.teacher is None:
            raise TeacherNotLoaded("This teacher host has no task data (a restarted actor): load it first.")
        return self.teacher

    def describe(self) -> TeacherInfo:
        return self._loaded().describe()

    def check(self) -> None:
        self._loaded().check()

    def flops_per_call(self, split: str, example_ids: np.ndarray) -> Optional[float]:
        return self._loaded().flops_per_call(split, example_ids)

    def matmul_rate(self) -> Optional[float]:
        return self._loaded().matmul_rate()

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self._loaded().embed_tokens(ids)

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        return self._loaded().query(prompts, split, example_ids, call_ids)

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        return self._loaded().loss_and_grad(prompt, split, example_ids, labels, loss)

    def stats(self) -> dict:
        get = getattr(self._loaded(), "get_stats", None)
        return get() if get is not None else {}
