"""The Ray layer: teacher-query actors, student workers, the shared rate limiter and Tune's shared budget.

It imports no torch: a teacher actor that only calls a service stays a small process.

Nothing numerical lives here. Each pool is its in-process twin
(:class:`~gdfo_ray.teacher.TeacherPool`, :class:`~gdfo_ray.student.StudentGroup`)
with two things added that only exist with actors: pieces are dispatched as
actors free up, and work lost with a dead actor is done again. Ray restarts a
dead actor (``pool.max_actor_restarts``); a teacher's lost pieces are re-queried
(same call ids, so a service bills them once; the budget was charged once, before
dispatch); a restarted student worker gets the weights and optimizer state of
the last completed step before it does anything else.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import uuid
from typing import Any, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from gdfo_ray.config import GDFOConfig, PoolConfig
from gdfo_ray.exceptions import GDFOError, TeacherError
from gdfo_ray.ratelimit import Pacer
from gdfo_ray.student_group import StudentGroup
from gdfo_ray.tasks import TaskData
from gdfo_ray.teacher import TeacherHost, TeacherNotLoaded, TeacherPool

NAMESPACE = "gdfo_ray"


def init_ray(pool: PoolConfig) -> bool:
    """Join ``pool.ray_address`` / ``$RAY_ADDRESS``, or start Ray locally; True if started here.

    With neither, Ray joins the cluster the last ``ray start`` on this machine registered (how
    ``ray submit`` reaches its head) and starts one only when there is none; ``local`` always
    starts one, for a run that must not share a cluster running on the same machine.
    """
    if ray.is_initialized():
        return False
    address = pool.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        ray.init(address=address, num_cpus=pool.ray_num_cpus, include_dashboard=False, namespace=NAMESPACE)
    else:
        ray.init(address=address, namespace=NAMESPACE)
    return True


def actor_bundles(config: GDFOConfig) -> list[dict]:
    """One resource request per actor the run starts: its teacher-query actors, then its student workers."""
    p = config.pool
    teacher = {"CPU": p.teacher_num_cpus, "GPU": p.teacher_num_gpus, **p.teacher_resources}
    bundles = [teacher] * p.n_teacher_actors
    if config.uses_student:
        bundles += [{"CPU": p.student_num_cpus, "GPU": student_gpus(p)}] * p.n_student_workers
    return [{k: v for k, v in b.items() if v} for b in bundles]


def shortfall(bundles: list[dict]) -> tuple[dict, dict, dict]:
    """What ``bundles`` ask for in all, what the Ray cluster holds of it, and what it lacks ({}: none).

    The one fit check of runs (:func:`check_pool_fits`) and of Tune's trials.
    """
    need: dict = collections.Counter()
    for bundle in bundles:
        need.update(bundle)
    total = ray.cluster_resources()
    have = {k: total.get(k, 0.0) for k in need}
    return dict(need), have, {k: v for k, v in need.items() if v > have[k] + 1e-9}


def check_pool_fits(config: GDFOConfig, poll_s: float = 2.0) -> None:
    """Fail clearly when the cluster cannot hold the run's actors; Ray would leave them pending forever.

    Waits up to ``pool.wait_for_resources_s`` for nodes to join first (an autoscaling cluster).
    """
    deadline = time.monotonic() + config.pool.wait_for_resources_s
    while True:
        need, have, short = shortfall(actor_bundles(config))
        if not short:
            return
        if time.monotonic() >= deadline:
            raise GDFOError(
                f"The run's actors need {need}, but the Ray cluster has {have} in "
                f"all (waited {config.pool.wait_for_resources_s:.0f} s for more). Lower pool.n_teacher_actors, "
                "pool.n_student_workers or their pool.*_num_cpus / *_num_gpus / teacher_resources, add nodes, or "
                "use --backend local."
            )
        time.sleep(poll_s)


def make_limiter(pool: PoolConfig):
    """The rate limiter actor every teacher of a pool shares (owned by the caller: it lives while held).

    To share one limit among several pools (runs or trials querying the same
    service), create it once in the process that outlives them and pass it to
    :func:`make_ray_teacher_pool`.
    """
    return ray.remote(LimiterActor).options(num_cpus=0, max_concurrency=10_000).remote(
        pool.calls_per_s, pool.max_in_flight, pool.rate_burst)


class RayTeacherPool(TeacherPool):
    """Pieces go to whichever actor has a free slot; a piece lost with its actor is sent again.

    Each actor also holds ``queued_per_teacher`` pieces in its queue, so that it
    starts the next call as soon as one ends instead of waiting a round trip to
    the driver for it.
    """

    queued_per_teacher = 1
    restart_timeout_s = 300.0

    def __init__(self, actors: list, *, one_call_per_piece: bool, slots_per_teacher: int, max_requeries: int,
                 data_ref: Any = None):
        super().__init__(actors, one_call_per_piece=one_call_per_piece, slots_per_teacher=slots_per_teacher)
        self.max_requeries = max_requeries
        self.requeried = 0
        self.data_ref = data_ref  # the task data, given again to an actor that Ray restarted

    def run_pieces(self, method: str, pieces: list[tuple]) -> list:
        results: list = [None] * len(pieces)
        tries = [0] * len(pieces)
        waiting = collections.deque(range(len(pieces)))
        load = [0] * len(self.teachers)
        in_flight: dict = {}  # ObjectRef -> (piece, actor)
        depth = self.slots_per_teacher + self.queued_per_teacher
        started = time.monotonic()
        while waiting or in_flight:
            while waiting and min(load) < depth:
                actor = load.index(min(load))
                piece = waiting.popleft()
                ref = getattr(self.teachers[actor], method).remote(*pieces[piece])
                in_flight[ref] = (piece, actor)
                load[actor] += 1
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                piece, actor = in_flight.pop(ref)
                load[actor] -= 1
                try:
                    results[piece] = ray.get(ref)
                except TeacherNotLoaded:  # Ray restarted this actor: it gets the task data again, then the piece
                    ray.get(self.teachers[actor].load.remote(self.data_ref))
                    self.requeried += 1
                    waiting.appendleft(piece)
                except ActorUnavailableError as e:  # restarting: not lost for good, so not counted
                    if time.monotonic() - started > self.restart_timeout_s:
                        raise TeacherError(f"A teacher-query actor stayed unavailable for "
                                           f"{self.restart_timeout_s:.0f} s: {e}") from e
                    self.requeried += 1
                    waiting.appendleft(piece)
                    time.sleep(0.2)
                except RayActorError as e:
                    tries[piece] += 1
                    if tries[piece] > self.max_requeries:
                        raise TeacherError(
                            f"A teacher-query actor died {tries[piece]} times while answering the same piece "
                            f"({method}); giving up after pool.max_requeries={self.max_requeries}. Last error: {e}"
                        ) from e
                    self.requeried += 1
                    waiting.appendleft(piece)  # the restarted actor (or another) takes it again
        return results

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.teachers])


def make_ray_teacher_pool(config: GDFOConfig, data: TaskData, limiter_actor: Any = None,
                          token: Optional[str] = None) -> RayTeacherPool:
    """``n_teacher_actors`` actors, each holding a teacher (a local model, or a client of the service).

    A service teacher's calls go through one limiter: ``limiter_actor`` if given
    (shared with other pools), else a new one when ``pool.calls_per_s`` or
    ``pool.max_in_flight`` is set.
    """
    p, service = config.pool, config.model.teacher_is_service
    limiter = None
    if service:
        token = config.service_token(token)
        if limiter_actor is None and p.limited:
            limiter_actor = make_limiter(p)
        limiter = SharedLimiter(limiter_actor, counts_in_flight=p.max_in_flight is not None) if limiter_actor is not None else None
    cls = ray.remote(TeacherHost).options(
        num_cpus=p.teacher_num_cpus, num_gpus=p.teacher_num_gpus, resources=dict(p.teacher_resources) or None,
        max_restarts=p.max_actor_restarts, max_concurrency=p.calls_per_actor,
    )
    # Small constructor arguments (a restart rebuilds the actor from them); the data follows through load().
    actors = [cls.remote(config, token, limiter) for _ in range(p.n_teacher_actors)]
    data_ref = ray.put(data)
    try:
        ray.get([a.load.remote(data_ref) for a in actors])  # surfaces a failed start (bad model, bad URL) here
    except RayActorError as e:
        raise TeacherError(f"A teacher-query actor failed to start: {e}") from e
    pool = RayTeacherPool(actors, one_call_per_piece=service, slots_per_teacher=p.calls_per_actor,
                          max_requeries=p.max_requeries, data_ref=data_ref)
    pool.limiter = limiter_actor  # held here: the actor lives while its owner's handle does
    return pool


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
    again, so the result equals an uninterrupted run.
    """

    def __init__(self, workers: list, max_recoveries: int, data_ref: Any = None):
        self._index = {id(w): i for i, w in enumerate(workers)}
        self.max_recoveries = max_recoveries
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
            except (RayActorError, StudentRestarted) as e:
                if attempt == self.max_recoveries:
                    raise GDFOError(f"Student workers kept failing; gave up after {self.max_recoveries} recoveries "
                                    f"(pool.max_actor_restarts). Last error: {e}") from e
                self.recoveries += 1
                self._incarnations = self._restore_all()
                continue
            if mutates:
                self._snapshot = StudentGroup.state(self)
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
        return self._recovering(super().predict_fitness, Z, rows)

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


def student_gpus(pool: PoolConfig) -> float:
    """Per-worker GPUs: as configured, else one when the cluster has any."""
    if pool.student_num_gpus is not None:
        return pool.student_num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def make_ray_student_group(config: GDFOConfig, data: TaskData) -> RayStudentGroup:
    p = config.pool
    cls = ray.remote(StudentWorker).options(num_cpus=p.student_num_cpus, num_gpus=student_gpus(p),
                                            max_restarts=p.max_actor_restarts)
    workers = [cls.remote(config) for _ in range(p.n_student_workers)]
    return RayStudentGroup(workers, max_recoveries=p.max_actor_restarts, data_ref=ray.put(data))


def shutdown_actors(*pools) -> None:
    for pool in pools:
        for actor in getattr(pool, "teachers", []) + getattr(pool, "workers", []):
            ray.kill(actor)


class LimiterActor:
    """The body of the Ray actor that one black box's callers share (see :func:`make_limiter`).

    Async, so thousands of waiting ``acquire`` calls cost no threads; it hands out
    slots in arrival order and start times from one :class:`Pacer`.
    """

    def __init__(self, calls_per_s: Optional[float], max_in_flight: Optional[int], burst: int = 1):
        self._pacer = Pacer(calls_per_s, burst)
        self._max_in_flight = max_in_flight
        self._slots = None
        self.settings = {"calls_per_s": calls_per_s, "max_in_flight": max_in_flight, "burst": burst}
        self.acquired = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    async def acquire(self) -> float:
        """Wait for a slot in flight; returns the delay the caller must sleep before starting."""
        if self._max_in_flight:
            if self._slots is None:  # created on the actor's event loop
                import asyncio

                self._slots = asyncio.Semaphore(self._max_in_flight)
            await self._slots.acquire()
        self.acquired += 1
        if self._max_in_flight:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return self._pacer.reserve(time.monotonic())

    async def release(self) -> None:
        if self._max_in_flight:
            self.in_flight -= 1
            self._slots.release()

    async def stats(self) -> dict:
        return {**self.settings, "acquired": self.acquired, "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight}


class SharedLimiter:
    """A teacher's view of a :class:`LimiterActor`: the blocking ``acquire``/``release`` of :class:`LocalLimiter`."""

    def __init__(self, handle, counts_in_flight: bool = True):
        self.handle = handle
        self.counts_in_flight = counts_in_flight  # without an in-flight cap, release needs no message

    def acquire(self) -> None:
        delay = ray.get(self.handle.acquire.remote())
        if delay > 0:
            time.sleep(delay)

    def release(self) -> None:
        if self.counts_in_flight:
            self.handle.release.remote()


class SharedBudget:
    """Train calls all trials may spend together; its count survives a restart in ``path``."""

    def __init__(self, total: Optional[int], path: str):
        self.total, self.path = total, path
        self.spent = 0
        if os.path.exists(path):
            with open(path) as f:
                self.spent = int(json.load(f)["spent"])
        self._lock = threading.Lock()

    def reserve(self, calls: int) -> bool:
        with self._lock:
            if self.total is not None and self.spent + calls > self.total:
                return False
            self.spent += calls
            with open(self.path + ".tmp", "w") as f:
                json.dump({"spent": self.spent, "total": self.total}, f)
            os.replace(self.path + ".tmp", self.path)
            return True

    def state(self) -> dict:
        return {"spent": self.spent, "total": self.total}
