"""The Ray layer: every line of the package that imports Ray (Tune's search aside, in :mod:`gdfo_ray.tune`).

It imports no torch: a teacher actor that only calls a service stays a small process.

Nothing numerical lives here. Each pool is its in-process twin
(:class:`~gdfo_ray.teachers.TeacherPool`, :class:`~gdfo_ray.student_group.StudentGroup`)
with two things added that only exist with actors: pieces are dispatched as
actors free up, and work lost with a dead actor is done again. Ray restarts a
dead actor (``pool.max_actor_restarts``); a teacher's lost pieces are re-queried
(same call ids, so a service bills them once; the budget was charged once, before
dispatch); a restarted student worker gets the weights and optimizer state of
the last completed step before it does anything else. Actors are built from small
constructor arguments and given the task data afterwards, so a restart cannot lose them.

- :mod:`~gdfo_ray.distributed.cluster`: joining or starting Ray, the one fit check, releasing actors.
- :mod:`~gdfo_ray.distributed.teachers`, :mod:`~gdfo_ray.distributed.students`: the actor pools.
- :mod:`~gdfo_ray.distributed.limits`: the shared rate limiter and Tune's shared budget.
- :mod:`~gdfo_ray.distributed.tasks`: functions run as Ray tasks (a campaign's cells).
"""

from __future__ import annotations

from typing import Any, Optional

from gdfo_ray.config import GDFOConfig
from gdfo_ray.distributed.cluster import (NAMESPACE, actor_bundles, check_pool_fits, init_ray, largest_node_cpus,
                                          ray_session, release_ray_pools, shortfall, student_gpus)
from gdfo_ray.distributed.limits import (LimiterActor, SharedBudget, SharedLimiter, budget_reservation, make_limiter,
                                         make_shared_budget)
from gdfo_ray.distributed.students import RayStudentGroup, StudentRestarted, StudentWorker, make_ray_student_group
from gdfo_ray.distributed.teachers import RayTeacherPool, TeacherActor, make_ray_teacher_pool
from gdfo_ray.tasks import TaskData


def make_ray_pools(config: GDFOConfig, data: TaskData, limiter_actor: Any = None,
                   token: Optional[str] = None) -> tuple[RayTeacherPool, Optional[RayStudentGroup], bool]:
    """The run's teacher pool and student group as actors; the third value is True when Ray started here.

    Fails before any actor starts when the cluster cannot hold them (:func:`check_pool_fits`).
    """
    started = init_ray(config.pool)
    check_pool_fits(config)
    teacher = make_ray_teacher_pool(config, data, limiter_actor=limiter_actor, token=token)
    student = make_ray_student_group(config, data) if config.uses_student else None
    return teacher, student, started


__all__ = [
    "NAMESPACE", "LimiterActor", "RayStudentGroup", "RayTeacherPool", "SharedBudget", "SharedLimiter",
    "StudentRestarted", "StudentWorker", "TeacherActor", "actor_bundles", "budget_reservation", "check_pool_fits",
    "init_ray", "largest_node_cpus", "make_limiter", "make_ray_pools", "make_ray_student_group",
    "make_ray_teacher_pool", "make_shared_budget", "ray_session", "release_ray_pools", "shortfall", "student_gpus",
]
