"""What answers a score request: a model behind one batching thread, or a simulated black box."""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from gdfo_ray.serve.requests import ScoreRequest
from gdfo_ray.serve.settings import ServeConfig
from gdfo_ray.wire import WireError


class SimulatedScorer:
    """A black box with a fixed latency and no model: logits are a fixed function of prompt and text.

    Requests do not queue: like a large remote service, it answers every call after
    ``latency`` whatever the concurrency, so what a benchmark measures is the client.
    """

    kind = "causal_lm"

    def __init__(self, config: ServeConfig):
        self.latency, self.hidden = config.simulate_latency_s, config.simulate_hidden
        self.directions = np.random.default_rng(0).normal(size=(config.max_classes, self.hidden)).astype(np.float32)
        self._noise_cache: dict = {}

    def info(self) -> dict:
        return {"model": f"simulated(latency={self.latency}s)", "kind": self.kind, "hidden_size": self.hidden,
                "embedding_std": 1.0, "vocab_size": 1000}

    def embed(self, ids: list) -> np.ndarray:
        return np.stack([np.random.default_rng(i).normal(size=self.hidden).astype(np.float32) for i in ids])

    def _noise(self, text: str) -> np.ndarray:
        noise = self._noise_cache.get(text)
        if noise is None:
            noise = np.random.default_rng(zlib.crc32(text.encode())).normal(size=self.directions.shape[0])
            if len(self._noise_cache) < 100_000:
                self._noise_cache[text] = noise
        return noise

    async def prepare(self, req: ScoreRequest) -> ScoreRequest:
        return req

    def tokens(self, req: ScoreRequest) -> int:
        """Rows x prompt tokens, plus the words of every text (this black box has no tokenizer)."""
        words = sum(len(t.split()) for t in req.texts) + sum(len(t.split()) for t in req.pairs or [])
        return req.rows * req.prompt.shape[0] + words

    async def submit(self, req: ScoreRequest) -> np.ndarray:
        return await self.score(req)

    async def score(self, req: ScoreRequest) -> np.ndarray:
        await asyncio.sleep(self.latency)
        c = len(req.verbalizer)
        # float64, so that even a prompt a search has blown up to huge values gives finite scores.
        mean = req.prompt.astype(np.float64).mean(axis=0)
        signal = np.tanh(np.nan_to_num(self.directions[:c].astype(np.float64) @ mean / math.sqrt(self.hidden)))
        noise = np.stack([self._noise(t)[:c] for t in req.texts])
        return (2.0 * signal[None, :] + noise).astype(np.float32)

    def close(self) -> None:
        pass


@dataclass
class _Pending:
    view: Any
    enc: Any
    prompt: np.ndarray
    rows: int
    future: asyncio.Future


class ModelScorer:
    """An HF LM behind a queue: one model thread takes as many waiting requests as fit one forward."""

    def __init__(self, config: ServeConfig):
        from gdfo_ray.models import load_lm, pick_device, resolve_dtype, set_threads

        set_threads(config.threads)
        self.config = config
        device = pick_device(config.device)
        self.dtype = resolve_dtype(config.dtype, device)
        self.tokenizer, self.model, self.kind = load_lm(config.model, config.kind, self.dtype, need_lm_head=True)
        self.model.to(device)
        self.model.requires_grad_(False)
        self.embeddings = self.model.get_input_embeddings()
        self._views: collections.OrderedDict = collections.OrderedDict()
        self._encodings: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="gdfo-serve-model")
        self._pending: collections.deque = collections.deque()
        self._wakeup: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self.batches = 0
        self.batched_requests = 0

    def info(self) -> dict:
        return {"model": self.config.model, "kind": self.kind, "hidden_size": int(self.embeddings.weight.shape[1]),
                "embedding_std": float(self.embeddings.weight.detach().float().std()),
                "vocab_size": int(self.embeddings.weight.shape[0]), "dtype": self.dtype}

    def embed(self, ids: list) -> np.ndarray:
        import torch

        vocab = self.embeddings.weight.shape[0]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise WireError(f"token_ids must lie in [0, {vocab}), but got {bad[:5]}.")
        with torch.inference_mode():
            return self.embeddings(torch.as_tensor(ids, device=self.embeddings.weight.device)).float().cpu().numpy()

    def _prepare(self, req: ScoreRequest):
        """The request's view (template + verbalizer) and its encoded inputs, both cached (LRU)."""
        from gdfo_ray.models import PromptedLM, encode_split
        from gdfo_ray.tasks import Split, TaskSpec

        key = (req.template, req.verbalizer, req.max_text_tokens)
        with self._lock:
            view = self._views.get(key)
            if view is None:
                spec = TaskSpec("request", req.verbalizer, req.verbalizer, req.pairs is not None, "accuracy", "ce",
                                req.template, req.template)
                view = PromptedLM(self.tokenizer, self.model, self.kind, spec, "verbalizer", str(self.config.model),
                                  req.max_text_tokens, self.config.max_rows_per_forward,
                                  max_tokens_per_forward=self.config.max_tokens_per_forward)
                self._views[key] = view
                while len(self._views) > 64:
                    self._views.popitem(last=False)
            self._views.move_to_end(key)
            enc_key = (key, tuple(req.texts), tuple(req.pairs) if req.pairs is not None else None)
            enc = self._encodings.get(enc_key)
        if enc is None:
            split = Split(req.texts, req.pairs, np.zeros(req.rows, dtype=np.int64))
            enc = encode_split(self.tokenizer, view.template, self.kind, split, req.max_text_tokens)
            n = req.prompt.shape[0]
            for i, (before, after) in enumerate(zip(enc.before, enc.after)):
                # A causal LM reads the label at the last token: a row must hold one, or the forward fails.
                if len(before) + n + len(after) == 0 or (self.kind == "causal_lm" and n == 0 and not after):
                    raise WireError(f"inputs[{i}] with this template and a prompt of {n} tokens gives the model no "
                                    "token to read the label at; send a non-empty text or prompt.")
            with self._lock:
                self._encodings[enc_key] = enc
                while len(self._encodings) > 256:
                    self._encodings.popitem(last=False)
        return view, enc

    async def prepare(self, req: ScoreRequest) -> tuple:
        """The request tokenized and checked (off the event loop); raises :class:`WireError` for bad input."""
        view, enc = await asyncio.get_running_loop().run_in_executor(None, self._prepare, req)
        return view, enc, req

    def tokens(self, prepared: tuple) -> int:
        _, enc, req = prepared
        return sum(len(b) + len(a) for b, a in zip(enc.before, enc.after)) + req.rows * req.prompt.shape[0]

    async def submit(self, prepared: tuple) -> np.ndarray:
        view, enc, req = prepared
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.create_task(self._drain())
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(view, enc, req.prompt, req.rows, future))
        self._wakeup.set()
        return await future

    async def score(self, req: ScoreRequest) -> np.ndarray:
        return await self.submit(await self.prepare(req))

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, rows = [], 0
            while self._pending and (not batch or rows + self._pending[0].rows <= self.config.max_batch_rows):
                item = self._pending.popleft()
                batch.append(item)
                rows += item.rows
            self.batches += 1
            self.batched_requests += len(batch)
            try:
                outs = await loop.run_in_executor(self._model_thread, self._forward, batch)
            except Exception as e:
                if len(batch) == 1:
                    outs = [e]
                else:  # one request's failure must not fail the others: each is scored again on its own
                    outs = []
                    for item in batch:
                        try:
                            outs += await loop.run_in_executor(self._model_thread, self._forward, [item])
                        except Exception as alone:
                            outs.append(alone)
            for item, out in zip(batch, outs):
                if item.future.done():
                    continue
                if isinstance(out, Exception):
                    item.future.set_exception(out)
                else:
                    item.future.set_result(out)

    def _forward(self, batch: list) -> list:
        """One forward per group of requests sharing a view and a prompt length."""
        import torch

        from gdfo_ray.models import EncodedSplit

        outs: list = [None] * len(batch)
        groups: dict = collections.defaultdict(list)
        for i, item in enumerate(batch):
            groups[(id(item.view), item.prompt.shape[0])].append(i)
        for members in groups.values():
            view = batch[members[0]].view
            before, after, slots, prompts = [], [], [], []
            for i in members:
                item = batch[i]
                before += item.enc.before
                after += item.enc.after
                slots.append(item.enc.slot)
                prompts.append(item.prompt)
            merged = EncodedSplit(before, after, np.concatenate(slots))
            owner = np.repeat(np.arange(len(members)), [batch[i].rows for i in members])
            with torch.inference_mode():
                p = torch.tensor(np.stack(prompts), dtype=torch.float32, device=view.device)
                logits = view.score_shared(p, owner, np.arange(len(before)), merged).cpu().numpy()
            start = 0
            for i in members:
                outs[i] = logits[start:start + batch[i].rows]
                start += batch[i].rows
        return outs

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._model_thread.shutdown(wait=True)  # a forward in flight finishes; no thread outlives the service


def make_scorer(config: ServeConfig):
    return SimulatedScorer(config) if config.simulate_latency_s is not None else ModelScorer(config)
