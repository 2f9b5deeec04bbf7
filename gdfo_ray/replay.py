"""The teacher's paid answers, kept and sampled for distillation: numpy only, so the driver needs no torch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class DistillBatch:
    """One optimizer step's rows: (z, example) pairs with the teacher's logits and gold labels.

    ``pop_*`` (optional) is one population for the ranking term: its candidates, the
    teacher's fitness of each, and the train examples the student scores them on.
    """

    z: np.ndarray  # (M, d)
    rows: np.ndarray  # (M,) train example indices
    teacher: np.ndarray  # (M, C)
    labels: np.ndarray  # (M,)
    pop_z: Optional[np.ndarray] = None  # (k, d)
    pop_fitness: Optional[np.ndarray] = None  # (k,)
    pop_rows: Optional[np.ndarray] = None  # (b,)

    def shard(self, n: int) -> list["DistillBatch"]:
        """Split the rows for ``n`` data-parallel workers; the ranking term goes to the first."""
        parts = np.array_split(np.arange(len(self.rows)), n)
        return [DistillBatch(self.z[p], self.rows[p], self.teacher[p], self.labels[p],
                             *((self.pop_z, self.pop_fitness, self.pop_rows) if i == 0 else (None, None, None)))
                for i, p in enumerate(parts)]


class ReplayBuffer:
    """The teacher's paid answers, newest kept, at most ``capacity`` candidates.

    Example:
        >>> buf = ReplayBuffer(capacity=2)
        >>> for i in range(3): buf.add(np.full((1, 2), i), np.zeros((1, 4, 2)), np.arange(4), np.ones(1))
        >>> len(buf), buf.sample(5, np.random.default_rng(0), np.zeros(4, int)).z.shape
        (2, (5, 2))
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.z: deque = deque(maxlen=capacity)
        self.logits: deque = deque(maxlen=capacity)
        self.rows: deque = deque(maxlen=capacity)
        self.populations: deque = deque(maxlen=max(1, capacity))  # (Z, fitness) per generation

    def __len__(self) -> int:
        return len(self.z)

    def add(self, Z: np.ndarray, logits: np.ndarray, rows: np.ndarray, fitness: np.ndarray) -> None:
        for z, y in zip(Z, logits):
            self.z.append(np.asarray(z, dtype=np.float32))
            self.logits.append(np.asarray(y, dtype=np.float32))
            self.rows.append(np.asarray(rows))
        self.populations.append((np.asarray(Z, dtype=np.float32), np.asarray(fitness, dtype=np.float64)))

    def sample(self, n_rows: int, rng: np.random.Generator, labels: np.ndarray,
               pop_rows: int = 0) -> DistillBatch:
        """Uniform (candidate, example) pairs; with ``pop_rows`` > 0 also a random population for ranking."""
        cand = rng.integers(0, len(self.z), size=n_rows)
        within = np.asarray([rng.integers(0, len(self.rows[c])) for c in cand])
        rows = np.asarray([self.rows[c][j] for c, j in zip(cand, within)])
        batch = DistillBatch(np.stack([self.z[c] for c in cand]), rows,
                             np.stack([self.logits[c][j] for c, j in zip(cand, within)]), labels[rows])
        if pop_rows > 0 and len(self.populations):
            Z, fit = self.populations[int(rng.integers(0, len(self.populations)))]
            batch.pop_z, batch.pop_fitness = Z, fit
            batch.pop_rows = rng.choice(len(labels), size=min(pop_rows, len(labels)), replace=False)
        return batch
