"""The whole interface a black box must offer: prompt embeddings and example ids in, C logits out.

This module needs neither torch nor Ray.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gdfo_ray.exceptions import TeacherError


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


class TeacherNotLoaded(TeacherError):
    """Raised by a teacher host that holds no task data yet (a restarted actor): give it the data first."""
