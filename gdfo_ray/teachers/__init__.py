"""The black-box side: a teacher answers C logits per (prompt, example), nothing else.

:class:`~gdfo_ray.teachers.base.BaseTeacher` is the whole interface a black box must offer.
Three kinds implement it: :class:`~gdfo_ray.teachers.local.LocalTeacher` runs an HF model
in-process, :class:`~gdfo_ray.teachers.http.HttpTeacher` calls a service, and
:class:`~gdfo_ray.teachers.playback.PlaybackTeacher` plays a recording of answers back.
:class:`~gdfo_ray.teachers.pool.TeacherPool` splits one request over several teachers;
:func:`make_teacher` builds the one a config names, and :class:`TeacherHost` is what a
teacher-query actor runs. This package needs neither torch nor Ray: the local teacher
imports torch when it is built.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from gdfo_ray.config import GDFOConfig
from gdfo_ray.tasks import TaskData
from gdfo_ray.teachers.base import BaseTeacher, TeacherInfo, TeacherNotLoaded
from gdfo_ray.teachers.pool import TeacherPool

__all__ = ["BaseTeacher", "TeacherHost", "TeacherInfo", "TeacherNotLoaded", "TeacherPool", "make_teacher"]


def make_teacher(config: GDFOConfig, data: TaskData, token: Optional[str] = None, limiter: Any = None) -> BaseTeacher:
    """The teacher ``config.model.teacher`` names: a service for a URL, a recording of answers for a
    ``.npz`` file (:mod:`gdfo_ray.teachers.playback`), else a local model."""
    if config.model.teacher_is_recording:
        from gdfo_ray.teachers.playback import PlaybackTeacher

        return PlaybackTeacher(config.model.teacher, n_classes=data.spec.n_classes)
    if config.model.teacher_is_service:
        from gdfo_ray.teachers.http import HttpTeacher

        return HttpTeacher(config, data, token=token, limiter=limiter)
    from gdfo_ray.teachers.local import LocalTeacher

    return LocalTeacher(config, data)


class TeacherHost:
    """What a teacher-query actor runs: one teacher, built in the actor's process once it has the task data.

    It lives here, free of torch, so that an actor that only calls a service does not
    import it (a pool of 64 such actors stays small). The data comes through :meth:`load`
    rather than the constructor: an actor's constructor arguments must be small for Ray
    to restart it safely, and a restarted one answers :class:`TeacherNotLoaded` until the
    pool loads it again.
    """

    def __init__(self, config: GDFOConfig, token: Optional[str] = None, limiter: Any = None):
        self.config, self.token, self.limiter = config, token, limiter
        self.teacher: Optional[BaseTeacher] = None

    def load(self, data: TaskData) -> None:
        if self.teacher is None:
            self.teacher = make_teacher(self.config, data, token=self.token, limiter=self.limiter)

    def _loaded(self) -> BaseTeacher:
        if self.teacher is None:
            raise TeacherNotLoaded("This teacher host has no task data (a restarted actor): load it first.")
        return self.teacher

    def describe(self) -> TeacherInfo:
        return self._loaded().describe()

    def check(self) -> None:
        self._loaded().check()

    def flops_per_call(self, split: str, example_ids: np.ndarray) -> Optional[float]:
        return self._loaded().flops_per_call(split, example_ids)

    def matmul_rate(self) -> Optional[float]:
        return self._loaded().matmul_rate()

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self._loaded().embed_tokens(ids)

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        return self._loaded().query(prompts, split, example_ids, call_ids)

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        return self._loaded().loss_and_grad(prompt, split, example_ids, labels, loss)

    def stats(self) -> dict:
        get = getattr(self._loaded(), "get_stats", None)
        return get() if get is not None else {}
