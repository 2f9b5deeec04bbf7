"""Data-parallel students (gdfo_ray/student_group.py): averaged shard gradients equal one worker's step."""

import numpy as np
import pytest

from gdfo_ray.replay import DistillBatch
from gdfo_ray.student_group import StudentGroup


class LinearWorker:
    """A least-squares student w: loss = mean over rows of (z . w - teacher[:, 0])^2, plain SGD."""

    def __init__(self, d=3, lr=0.1):
        self.w, self.lr = np.zeros(d), lr

    def compute_grads(self, batch):
        err = batch.z @ self.w - batch.teacher[:, 0]
        return float(np.mean(err ** 2)), [2 * batch.z.T @ err / len(err)]

    def apply_grads(self, grads):
        self.w = self.w - self.lr * grads[0]

    def train_steps(self, batches):
        losses = []
        for b in batches:
            loss, grads = self.compute_grads(b)
            self.apply_grads(grads)
            losses.append(loss)
        return float(np.mean(losses))

    def state(self):
        return {"w": self.w.copy()}


def _batches(n=3, rows=10, seed=0):
    rng = np.random.default_rng(seed)
    return [DistillBatch(rng.normal(size=(rows, 3)), np.arange(rows), rng.normal(size=(rows, 2)),
                         np.zeros(rows, int)) for _ in range(n)]


def test_three_workers_on_uneven_shards_take_the_steps_of_one_worker_on_the_whole_batch():
    one, three = StudentGroup([LinearWorker()]), StudentGroup([LinearWorker() for _ in range(3)])
    loss_one, loss_three = one.distill(_batches()), three.distill(_batches())  # 10 rows: shards of 4, 3, 3
    assert loss_three == pytest.approx(loss_one)
    for worker in three.workers:  # replicas stay identical
        np.testing.assert_allclose(worker.w, one.workers[0].w)
    assert not np.allclose(one.state()["w"], 0)
