"""A teacher run in-process: an HF masked or causal LM (what a local teacher-query actor hosts).

Kept apart from :mod:`gdfo_ray.teacher` so that the pool and the service client
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
from gdfo_ray.teacher import BaseTeacher, TeacherInfo


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
        )
        self.lm.requires_grad_(False)
        if config.model.compile:
            body = self.lm.model.base_model
            body.forward = torch.compile(body.forward, dynamic=True)
        self._layer_std: Optional[tuple] = None
        if config.model.kv_cache:
            self.lm.cache_prefixes(["train", "dev"])  # scored in every call / every E calls; test only twice

    def describe(self) -> TeacherInfo:
        if self._layer_std is None:
            self._layer_std = tuple(self.lm.layer_input_std("train"))
        return TeacherInfo(self.name, self.lm.hidden_size, self.lm.embedding_std(),
                           self.lm.embeddings.weight.shape[0], self.lm.spec.n_classes,
                           str(self.lm.embeddings.weight.dtype).replace("torch.", ""), layer_std=self._layer_std)

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
        rows_p = p.repeat_interleave(b, dim=0)  # candidate-major: row i*b + j = (candidate i, example j)
        rows = np.tile(np.asarray(example_ids), k)
        with torch.inference_mode():
            logits = self.lm(rows_p, rows, split, deep=deep)
        return logits.reshape(k, b, -1).cpu().numpy()

    def flops_per_call(self, split: str, example_ids: np.ndarray) -> Optional[float]:
        """Counted by torch on one prompt, one row at a time: the work a call cannot do without."""
        from torch.utils.flop_counter import FlopCounterMode

        n = self._n_prompt_tokens
        p = torch.zeros((1, n, self.lm.hidden_size), dtype=torch.float32, device=self.lm.device)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            for i in np.asarray(example_ids).tolist():
                self.lm(p, np.asarray([i]), split)
        return float(counter.get_total_flops())

    def loss_and_grad(self, prompt: np.ndarray, split: str, example_ids: np.ndarray, labels: np.ndarray,
                      loss: str) -> tuple[float, np.ndarray]:
        p = host_tensor(prompt, self.lm.device, torch.float32).requires_grad_(True)
        rows = np.asarray(example_ids)
        logits = self.lm(p.unsqueeze(0).expand(len(rows), -1, -1), rows, split)
        value = task_loss(logits, host_tensor(labels, logits.device), loss)
        value.backward()
        return value.item(), p.grad.cpu().numpy()

