"""One or more student workers behind one interface; several average their gradients (data-parallel).

Free of torch and Ray: its Ray twin in :mod:`gdfo_ray.distributed` only changes how calls are sent.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from gdfo_ray.replay import DistillBatch


class StudentGroup:
    """One or more student workers; with several, each step averages their shard gradients.

    ``call(worker, method, *args)`` returns a handle and ``gather(handles)`` waits for
    them (the Ray twin sends ``.remote`` calls; the local twin calls directly).
    Replicas start identical (same seed) and stay so, since all apply the same average.
    """

    def __init__(self, workers: list, call=None, gather=None):
        if not workers:
            raise ValueError("A StudentGroup needs at least one worker.")
        self.workers = workers
        self.in_process = call is None  # it computes here, on the driver's cores
        self._call = call or (lambda w, method, *args: getattr(w, method)(*args))
        self._gather = gather or (lambda handles: list(handles))

    def _first(self, method: str, *args):
        return self._gather([self._call(self.workers[0], method, *args)])[0]

    def _all(self, method: str, *args) -> list:
        return self._gather([self._call(w, method, *args) for w in self.workers])

    def distill(self, batches: list[DistillBatch]) -> float:
        if len(self.workers) == 1:
            return self._first("train_steps", batches)
        losses = []
        for batch in batches:
            shards = batch.shard(len(self.workers))
            results = self._gather([self._call(w, "compute_grads", s) for w, s in zip(self.workers, shards)])
            weights = np.asarray([len(s.rows) for s in shards], dtype=np.float64) / len(batch.rows)
            averaged = [sum(w * grads[i] for w, (_, grads) in zip(weights, results)).astype(np.float32)
                        for i in range(len(results[0][1]))]
            self._all("apply_grads", averaged)
            losses.append(float(sum(w * loss for w, (loss, _) in zip(weights, results))))
        return float(np.mean(losses)) if losses else float("nan")

    def predict_fitness(self, Z: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        return self._first("predict_fitness", Z, rows)

    def observe(self, Z: np.ndarray, logits: np.ndarray, rows: np.ndarray) -> None:
        self._all("observe", Z, logits, rows)

    def set_prompt_space(self, A: np.ndarray, P0: np.ndarray) -> None:
        self._all("set_prompt_space", A, P0)

    def grad_z(self, z: np.ndarray) -> tuple[float, np.ndarray]:
        return self._first("grad_z", z)

    def predict(self, z: np.ndarray, split: str, rows: np.ndarray) -> Optional[np.ndarray]:
        return self._first("predict", z, split, rows)

    def state(self) -> dict:
        return self._first("state")

    def load_state(self, state: dict) -> None:
        self._all("load_state", state)
