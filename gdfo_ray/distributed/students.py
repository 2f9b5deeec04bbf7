"""The student workers: a group that restores every worker to the last completed step when one dies."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from gdfo_ray.config import GDFOConfig
from gdfo_ray.distributed.cluster import student_gpus
from gdfo_ray.exceptions import GDFOError
from gdfo_ray.student_group import StudentGroup
from gdfo_ray.tasks import TaskData


class StudentRestarted(GDFOError):
    """Raised inside a student worker that Ray restarted: it must be given the last weights first."""


class StudentWorker:
    """What a student worker actor runs: a trainer, tagged with an id that changes when Ray restarts it.

    The trainer is built by the first :meth:`restore`, which brings the task data: the
    constructor's arguments stay small, so that Ray can restart the actor safely.
    """

    def __init__(self, config: GDFOConfig):
        self.config = config
        self.trainer = None
        self.incarnation = uuid.uuid4().hex

    def run(self, incarnation: str, method: str, *args: Any) -> Any:
        if incarnation != self.incarnation or self.trainer is None:
            raise StudentRestarted("This student worker was restarted and holds its initial weights.")
        return getattr(self.trainer, method)(*args)

    def restore(self, state: Optional[dict], data: Optional[TaskData] = None) -> str:
        """Take ``state`` (None: the initial weights), building the trainer from ``data`` first if there is none;
        returns the incarnation to address from now on."""
        if self.trainer is None:
            if data is None:
                raise StudentRestarted("This student worker has no task data yet: restore it with the data.")
            from gdfo_ray.student import make_student

            self.trainer = make_student(self.config, data)
        if state is not None:
            self.trainer.load_state(state)
        return self.incarnation

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class RayStudentGroup(StudentGroup):
    """A :class:`StudentGroup` of actors that survives a worker's death.

    After every completed distillation it keeps the weights and optimizer state
    (small: the projection and the head). A call that fails because a worker died,
    or reaches a restarted worker, restores every worker to that state and runs
    again, so the result equals an uninterrupted run. A student whose prediction changes
    it (``predict_mutates``: oracle:S rescales its noise to each population it ranks) is
    kept after every prediction too, or a worker dead before the next gradient would
    come back with the amplitude of the population before.
    """

    def __init__(self, workers: list, max_recoveries: int, data_ref: Any = None, predict_mutates: bool = False):
        self._index = {id(w): i for i, w in enumerate(workers)}
        self.max_recoveries = max_recoveries
        self.predict_mutates = predict_mutates
        self.recoveries = 0
        self._snapshot: Optional[dict] = None
        self.data_ref = data_ref  # the task data, from which a restarted worker rebuilds its trainer
        super().__init__(workers, call=self._send, gather=ray.get)
        self._incarnations = ray.get([w.restore.remote(None, data_ref) for w in workers])

    def _send(self, worker, method: str, *args):
        return worker.run.remote(self._incarnations[self._index[id(worker)]], method, *args)

    def _recovering(self, operation, *args, mutates: bool = False):
        for attempt in range(self.max_recoveries + 1):
            try:
                out = operation(*args)
                if mutates:  # inside the try: a worker that dies before it is kept is restored and asked again
                    snapshot = StudentGroup.state(self)
            except (RayActorError, StudentRestarted) as e:
                if attempt == self.max_recoveries:
                    raise GDFOError(f"Student workers kept failing; gave up after {self.max_recoveries} recoveries "
                                    f"(pool.max_actor_restarts). Last error: {e}") from e
                self.recoveries += 1
                self._incarnations = self._restore_all()
                continue
            if mutates:
                self._snapshot = snapshot
            return out
        raise AssertionError("unreachable")

    def _restore_all(self, timeout_s: float = 300.0) -> list:
        """Give every worker the last weights, waiting out a worker that Ray is still restarting."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([w.restore.remote(self._snapshot, self.data_ref) for w in self.workers])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def distill(self, batches: list) -> float:
        return self._recovering(super().distill, batches, mutates=True)

    def predict_fitness(self, Z, rows=None):
        return self._recovering(super().predict_fitness, Z, rows, mutates=self.predict_mutates)

    def observe(self, Z, logits, rows) -> None:
        self._recovering(super().observe, Z, logits, rows, mutates=True)

    def set_prompt_space(self, A, P0) -> None:
        self._recovering(super().set_prompt_space, A, P0, mutates=True)

    def grad_z(self, z):
        return self._recovering(super().grad_z, z)

    def predict(self, z, split: str, rows):
        return self._recovering(super().predict, z, split, rows)

    def state(self) -> dict:
        return self._recovering(super().state)

    def load_state(self, state: dict) -> None:
        self._recovering(super().load_state, state)
        self._snapshot = state


def make_ray_student_group(config: GDFOConfig, data: TaskData) -> RayStudentGroup:
    p = config.pool
    spec = config.model.student_spec
    cls = ray.remote(StudentWorker).options(num_cpus=p.student_num_cpus, num_gpus=student_gpus(p, spec),
                                            max_restarts=p.max_actor_restarts)
    workers = [cls.remote(config) for _ in range(p.n_student_workers)]
    return RayStudentGroup(workers, max_recoveries=p.max_actor_restarts, data_ref=ray.put(data),
                           predict_mutates=spec.noisy)
