"""Splitting one request into pieces over several teachers and putting the answers back in order.

Its Ray twin in :mod:`gdfo_ray.distributed` only changes how pieces are sent (and re-sends those
lost with a dead actor). This module needs neither torch nor Ray.
"""

from __future__ import annotations

import uuid
from typing import Any, Optional, Sequence

import numpy as np

from gdfo_ray.teachers.base import TeacherInfo


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
