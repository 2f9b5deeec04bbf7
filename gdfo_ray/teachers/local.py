"""A teacher run in-process: an HF masked or causal LM (what a local teacher-query actor hosts).

Kept apart from :mod:`gdfo_ray.teachers` so that the pool and the service client
import without torch: an actor that only waits on HTTP stays a small process.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from gdfo_ray.config import GDFOConfig
from gdfo_ray.losses import task_loss
from gdfo_ray.models import DeepPrompts, build_prompted_lm, host_tensor, set_threads
from gdfo_ray.tasks import TaskData
from gdfo_ray.teachers.base import BaseTeacher, TeacherInfo


class LocalTeacher(BaseTeacher):
    """An HF masked or causal LM run in this process, scoring the task's verbalizer."""

    def __init__(self, config: GDFOConfig, data: TaskData):
        set_threads(config.pool.torch_threads)
        torch.manual_seed(config.seeds.torch)
        self.name = config.model.teacher
        self._n_prompt_tokens = config.prompt.n_prompt_tokens
        self.lm = build_prompted_lm(
            config.model.teacher, config.model.teacher_kind, data.spec,
            {"train": data.train, "dev": data.dev, "test": data.test}, readout="verbalizer",
            dtype=config.model.dtype, device=config.model.device, max_text_tokens=config.task.max_text_tokens,
            max_rows_per_forward=config.model.max_rows_per_forward, need_lm_head=True,
            max_tokens_per_forward=config.model.max_tokens_per_forward,
        )
        self.lm.requires_grad_(False)
        if config.model.compile:
            body = self.lm.model.base_model
            body.forward = torch.compile(body.forward, dynamic=True)
        self._layer_std: Optional[tuple] = None
        self._share_prompts = config.model.kv_cache
        if config.model.kv_cache:
            self.lm.cache_prefixes(["train", "dev"])  # scored in every call / every E calls; test only twice

    def describe(self) -> TeacherInfo:
        if self._layer_std is None:
            self._layer_std = tuple(self.lm.layer_input_std("train"))
        return TeacherInfo(self.name, self.lm.hidden_size, self.lm.embedding_std(),
                           self.lm.embeddings.weight.shape[0], self.lm.spec.n_classes,
                           self._dtype, layer_std=self._layer_std)

    @property
    def _dtype(self) -> str:
        """The dtype the teacher computes in (``float32``, ``bfloat16``, ...)."""
        return str(self.lm.embeddings.weight.dtype).replace("torch.", "")

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        return self.lm.embed_tokens(ids).float().cpu().numpy()

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        k, b = prompts.shape[0], len(example_ids)
        p = host_tensor(prompts, self.lm.device, torch.float32)
        deep = None
        if p.ndim == 4:  # (k, L, n, h): layer 0 at the embeddings, the others on the hidden states
            owner = torch.arange(k, device=self.lm.device).repeat_interleave(b)
            p, deep = p[:, 0], DeepPrompts(p[:, 1:], owner)
        rows = np.tile(np.asarray(example_ids), k)  # candidate-major: row i*b + j = (candidate i, example j)
        with torch.inference_mode():
            if deep is None and self._share_prompts:
                logits = self.lm.forward_shared(p, np.arange(k).repeat(b), rows, split)
            else:
                logits = self.lm(p.repeat_interleave(b, dim=0), rows, split, deep=deep)
        return logits.reshape(k, b, -1).cpu().numpy()

    def flops_per_call(self, split: str, example_ids: np.ndarray) -> Optional[float]:
        """The work a call cannot do without: torch's count of one prompt's query, one row per forward.

        One row per forward leaves no padding; what the query shares between rows (a
        prompt's states, the text's cached states) is counted as the query does it.
        """
        from torch.utils.flop_counter import FlopCounterMode

        p = np.zeros((1, self._n_prompt_tokens, self.lm.hidden_size), dtype=np.float32)
        rows_per_forward, self.lm.max_rows = self.lm.max_rows, 1
        try:
            self.query(p, split, np.asarray(example_ids)[:1])  # caches the split's text states, if it has them, uncounted
            counter = FlopCounterMode(display=False)
            with counter:
                self.query(p, split, example_ids)
        finally:
            self.lm.max_rows = rows_per_forward
        return float(counter.get_total_flops())

    def matmul_rate(self) -> Optional[float]:
        from gdfo_ray.machine import matmul_rate

        return matmul_rate(self._dtype, str(self.lm.device))

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        p = host_tensor(prompt, self.lm.device, torch.float32).requires_grad_(True)
        rows = np.asarray(example_ids)
        logits = self.lm(p.unsqueeze(0).expand(len(rows), -1, -1), rows, split)
        value = task_loss(logits, host_tensor(labels, logits.device), loss)
        value.backward()
        return value.item(), p.grad.cpu().numpy()

