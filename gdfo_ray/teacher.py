"""The black-box side: a teacher answers C logits per (prompt, example), nothing else.

:class:`BaseTeacher` is the whole interface a service must offer. :class:`LocalTeacher`
runs an HF model in-process (what a teacher-query actor hosts). :class:`TeacherPool`
spreads one request over several teachers and reassembles by index; its Ray
twin in :mod:`gdfo_ray.distributed` only changes how a piece is sent.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gdfo_ray.config import GDFOConfig
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.losses import task_loss
from gdfo_ray.models import build_prompted_lm, host_tensor, set_threads
from gdfo_ray.tasks import TaskData


@dataclass(frozen=True)
class TeacherInfo:
    """What the user side may know of a black box to build its prompt space."""

    model: str
    hidden_size: int
    embedding_std: float
    vocab_size: int
    n_classes: int


class BaseTeacher(abc.ABC):
    """A black box: prompt embeddings and example ids in, verbalizer logits out."""

    @abc.abstractmethod
    def describe(self) -> TeacherInfo:
        """Hidden size and embedding statistics, for A's scaling (BBT)."""

    @abc.abstractmethod
    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """Embeddings of vocabulary tokens, for P0 (``prompt.init="vocab"``)."""

    @abc.abstractmethod
    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray) -> np.ndarray:
        """Logits ``(k, B, C)`` of ``k`` prompts ``(k, n, h)`` on the examples ``example_ids`` of ``split``."""

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        """Loss and its gradient in the prompt ``(n, h)``: only a local (white-box) teacher has it."""
        raise TeacherError(
            f"{type(self).__name__} is a black box and returns no gradients; method 'white_box' needs a "
            "local teacher (a model id or path)."
        )


class LocalTeacher(BaseTeacher):
    """An HF masked or causal LM run in this process, scoring the task's verbalizer."""

    def __init__(self, config: GDFOConfig, data: TaskData):
        set_threads(config.pool.torch_threads)
        torch.manual_seed(config.seed)
        self.name = config.model.teacher
        self.lm = build_prompted_lm(
            config.model.teacher, config.model.teacher_kind, data.spec,
            {"train": data.train, "dev": data.dev, "test": data.test}, readout="verbalizer",
            dtype=config.model.dtype, device=config.model.device, max_text_tokens=config.task.max_text_tokens,
            max_rows_per_forward=config.model.max_rows_per_forward, need_lm_head=True,
        )
        self.lm.requires_grad_(False)

    def describe(self) -> TeacherInfo:
        return TeacherInfo(self.name, self.lm.hidden_size, self.lm.embedding_std(),
                           self.lm.embeddings.weight.shape[0], self.lm.spec.n_classes)

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self.lm.embed_tokens(ids).float().cpu().numpy()

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray) -> np.ndarray:
        k, b = prompts.shape[0], len(example_ids)
        p = host_tensor(prompts, self.lm.device, torch.float32)
        rows_p = p.repeat_interleave(b, dim=0)  # candidate-major: row i*b + j = (candidate i, example j)
        rows = np.tile(np.asarray(example_ids), k)
        with torch.inference_mode():
            logits = self.lm(rows_p, rows, split)
        return logits.reshape(k, b, -1).cpu().numpy()

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        p = host_tensor(prompt, self.lm.device, torch.float32).requires_grad_(True)
        rows = np.asarray(example_ids)
        logits = self.lm(p.unsqueeze(0).expand(len(rows), -1, -1), rows, split)
        value = task_loss(logits, host_tensor(labels, logits.device), loss)
        value.backward()
        return value.item(), p.grad.cpu().numpy()


class TeacherPool:
    """Spreads a request over teachers (by candidate, or by example for one prompt) and reassembles by index.

    ``call(i, method, *args)`` runs one piece on teacher ``i`` and returns a handle;
    ``gather(handles)`` waits for them. The local twin runs them in turn.
    """

    def __init__(self, teachers: Sequence[Any], call: Callable | None = None, gather: Callable | None = None):
        if not teachers:
            raise ValueError("A TeacherPool needs at least one teacher.")
        self.teachers = list(teachers)
        self._call = call or (lambda t, method, *args: getattr(t, method)(*args))
        self._gather = gather or (lambda handles: list(handles))

    def __len__(self) -> int:
        return len(self.teachers)

    def describe(self) -> TeacherInfo:
        return self._gather([self._call(self.teachers[0], "describe")])[0]

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self._gather([self._call(self.teachers[0], "embed_tokens", list(ids))])[0]

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray) -> np.ndarray:
        k, n_pool = prompts.shape[0], len(self.teachers)
        example_ids = np.asarray(example_ids)
        if k >= n_pool or len(example_ids) < n_pool:
            pieces = [p for p in np.array_split(np.arange(k), n_pool) if len(p)]
            handles = [self._call(self.teachers[i], "query", prompts[p], split, example_ids)
                       for i, p in enumerate(pieces)]
            return np.concatenate(self._gather(handles), axis=0)
        pieces = [p for p in np.array_split(np.arange(len(example_ids)), n_pool) if len(p)]
        handles = [self._call(self.teachers[i], "query", prompts, split, example_ids[p])
                   for i, p in enumerate(pieces)]
        return np.concatenate(self._gather(handles), axis=1)

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        return self._gather([self._call(self.teachers[0], "loss_and_grad", prompt, split, example_ids,
                                        labels, loss)])[0]
