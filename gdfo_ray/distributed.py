"""The Ray layer: teacher-query actors and student worker actors behind the pools' protocols.

Nothing numerical lives here. Each pool is the same class as its in-process twin
(:class:`~gdfo_ray.teacher.TeacherPool`, :class:`~gdfo_ray.student.StudentGroup`),
given a ``call`` that sends ``.remote`` and a ``gather`` that is ``ray.get``.
"""

from __future__ import annotations

import os

import ray

from gdfo_ray.config import GDFOConfig, PoolConfig
from gdfo_ray.student import StudentGroup, StudentTrainer
from gdfo_ray.tasks import TaskData
from gdfo_ray.teacher import LocalTeacher, TeacherPool


def init_ray(pool: PoolConfig) -> bool:
    """Join ``pool.ray_address`` / ``$RAY_ADDRESS``, or start Ray locally; True if started here."""
    if ray.is_initialized():
        return False
    address = pool.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=pool.ray_num_cpus, include_dashboard=False)
    return True


def _remote_call(actor, method: str, *args):
    return getattr(actor, method).remote(*args)


def make_ray_teacher_pool(config: GDFOConfig, data: TaskData) -> TeacherPool:
    """``n_teacher_actors`` actors, each holding the teacher and the tokenized task."""
    p = config.pool
    cls = ray.remote(LocalTeacher).options(num_cpus=p.teacher_num_cpus, num_gpus=p.teacher_num_gpus,
                                           resources=dict(p.teacher_resources) or None)
    data_ref = ray.put(data)
    actors = [cls.remote(config, data_ref) for _ in range(p.n_teacher_actors)]
    return TeacherPool(actors, call=_remote_call, gather=ray.get)


def student_gpus(pool: PoolConfig) -> float:
    """Per-worker GPUs: as configured, else one when the cluster has any."""
    if pool.student_num_gpus is not None:
        return pool.student_num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def make_ray_student_group(config: GDFOConfig, data: TaskData) -> StudentGroup:
    p = config.pool
    cls = ray.remote(StudentTrainer).options(num_cpus=p.student_num_cpus, num_gpus=student_gpus(p))
    data_ref = ray.put(data)
    workers = [cls.remote(config, data_ref) for _ in range(p.n_student_workers)]
    return StudentGroup(workers, call=_remote_call, gather=ray.get)


def shutdown_actors(*pools) -> None:
    for pool in pools:
        for actor in getattr(pool, "teachers", []) + getattr(pool, "workers", []):
            ray.kill(actor)
