"""The teacher-query actors: pieces dispatched as actors free up, and sent again when one dies."""

from __future__ import annotations

import collections
import time
from typing import Any, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from gdfo_ray.config import GDFOConfig
from gdfo_ray.distributed.limits import SharedLimiter, make_limiter
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.tasks import TaskData
from gdfo_ray.teachers import TeacherHost, TeacherNotLoaded, TeacherPool


class TeacherActor(TeacherHost):
    """What a teacher-query actor runs: a :class:`TeacherHost` that can say which node holds it."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


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
    cls = ray.remote(TeacherActor).options(
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
