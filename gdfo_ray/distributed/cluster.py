"""Joining or starting Ray (for a run, or a block: :func:`ray_session`), and whether the cluster can hold a run's actors."""

from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Iterator, Optional

import ray

from gdfo_ray.config import GDFOConfig, PoolConfig, StudentSpec
from gdfo_ray.exceptions import GDFOError

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


@contextlib.contextmanager
def ray_session(address: Optional[str]) -> Iterator[bool]:
    """Ray joined at ``address`` (see :func:`init_ray`) for the block; stopped after it if started here."""
    started = init_ray(PoolConfig(ray_address=address))
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def actor_bundles(config: GDFOConfig) -> list[dict]:
    """One resource request per actor the run starts: its teacher-query actors, then its student workers."""
    p = config.pool
    teacher = {"CPU": p.teacher_num_cpus, "GPU": p.teacher_num_gpus, **p.teacher_resources}
    bundles = [teacher] * p.n_teacher_actors
    if config.uses_student:
        student = {"CPU": p.student_num_cpus, "GPU": student_gpus(p, config.model.student_spec)}
        bundles += [student] * p.n_student_workers
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


def largest_node_cpus() -> int:
    """CPUs of the largest live node of the connected cluster: the most one task can be given."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


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


def student_gpus(pool: PoolConfig, student: Optional[StudentSpec] = None) -> float:
    """Per-worker GPUs: as configured, else one when the cluster has any and the student is a network (a gp
    student computes on the CPU, and a GPU it held would be one a teacher actor could not have)."""
    if pool.student_num_gpus is not None:
        return pool.student_num_gpus
    if student is not None and student.kind == "gp":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def release_ray_pools(*pools, stop_ray: bool = False) -> None:
    """Kill the pools' actors; then stop Ray too when ``stop_ray`` (it was started for them)."""
    for pool in pools:
        for actor in getattr(pool, "teachers", []) + getattr(pool, "workers", []):
            ray.kill(actor)
    if stop_ray:
        ray.shutdown()

