"""``gdfo serve``: any local LM as a black box over HTTP, the way a vendor would offer it.

The service returns verbalizer logits and nothing else: no gradients, no hidden
states. It is an aiohttp app in one process rather than a Ray Serve deployment:
it stands in for a third party's API, so it must run where there is no Ray
cluster at all; it starts in a second (tests and benchmarks start many); and on a
small machine one process leaves the cores to the model instead of to a
controller, a proxy and replica processes. Concurrent requests are batched into
one forward by a single model thread, so batching costs no timer: while one
forward runs, the next batch gathers.

API (JSON; arrays as ``{"dtype": "float32", "shape": [...], "data": base64}``,
little-endian; every route but ``/v1/health`` needs ``Authorization: Bearer <token>``):

- ``GET /v1/health``: ``{"status": "ok"}``.
- ``GET /v1/info``: model, kind, hidden_size, embedding_std, vocab_size and the limits.
- ``POST /v1/embed`` ``{"token_ids": [...]}``: ``{"embeddings": array (k, h)}``.
- ``POST /v1/score`` ``{"template", "verbalizer", "prompt": array (n, h), "inputs":
  [{"text", "text_pair"?}], "max_text_tokens"?}``: ``{"logits": array (B, C), ...}``.
  An ``Idempotency-Key`` header makes a retried call return the first answer, billed once.
- ``GET /v1/stats``: requests, billed calls, 429s, batches.

A bad request gets a 4xx with ``{"error": {"code", "message"}}``; over the rate
limit or with a full queue, a 429 with ``Retry-After`` (whole seconds) and ``Retry-After-Ms``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import os
import secrets
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from gdfo_ray.config import _check_int, _check_positive
from gdfo_ray.exceptions import ConfigError
from gdfo_ray.ratelimit import Pacer, pacer_fits
from gdfo_ray.wire import WireError, decode_array, encode_array

log = logging.getLogger("gdfo_ray.serve")

TOKEN_ENV = "GDFO_SERVE_TOKEN"
_SCORE_FIELDS = {"template", "verbalizer", "prompt", "inputs", "max_text_tokens"}
RATE_UNITS = ("calls", "rows", "tokens")


@dataclass(frozen=True)
class ServeConfig:
    """The service's settings; every limit is checked on every request.

    Args:
        model: HF model id or local path served (None with ``simulate_latency_s``).
        host, port: where to listen (port 0 picks a free one).
        token: the bearer token; None reads ``$GDFO_SERVE_TOKEN``, else one is generated and printed.
        kind, dtype, device, threads: how the model is loaded and run.
        max_batch_rows: (prompt x input) rows one batch may take across concurrent requests.
        max_rows_per_forward: rows per forward inside a batch (small chunks stay in cache).
        max_inputs, max_text_chars, max_text_tokens, max_prompt_tokens, max_classes: request limits.
        max_body_mb: largest request body (after decompression); a larger declared
            ``Content-Length`` is refused before anything is read.
        body_timeout_s: how long a request's body may take to arrive (408 after).
        max_queue: requests waiting for the model; beyond it the service answers 429.
        rate_limit, rate_burst: units per second accepted (None: no limit); above it, 429.
        rate_unit: what the rate limit counts: ``calls`` (one per request), ``rows`` (prompt x
            input rows of a request) or ``tokens`` (the tokens of its rows, prompt included).
            A request that weighs more than ``rate_burst`` can never pass and gets a 413.
        idempotency_cache, idempotency_cache_mb: answers kept for retried calls (by
            ``Idempotency-Key``), at most this many and this many MB together (oldest dropped).
        simulate_latency_s: serve a simulated black box with this fixed latency instead of a
            model (benchmarks, tests); its logits are a fixed function of prompt and text.
        simulate_hidden: the simulated model's hidden size.
    """

    model: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    kind: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0
    max_batch_rows: int = 256
    max_rows_per_forward: int = 64
    max_inputs: int = 512
    max_text_chars: int = 4000
    max_text_tokens: int = 128
    max_prompt_tokens: int = 256
    max_classes: int = 64
    max_body_mb: float = 64.0
    body_timeout_s: float = 30.0
    max_queue: int = 1024
    rate_limit: Optional[float] = None
    rate_burst: int = 1
    rate_unit: str = "calls"
    idempotency_cache: int = 8192
    idempotency_cache_mb: float = 256.0
    simulate_latency_s: Optional[float] = None
    simulate_hidden: int = 64

    def __post_init__(self) -> None:
        if (self.model is None) == (self.simulate_latency_s is None):
            raise ConfigError("Either pass a model to serve (--model) or --simulate-latency for a simulated one, "
                              "not both and not neither.")
        _check_int("port", self.port, 0)
        for name in ("max_batch_rows", "max_rows_per_forward", "max_inputs", "max_text_chars", "max_text_tokens", "max_prompt_tokens",
                     "max_queue", "rate_burst", "idempotency_cache", "simulate_hidden"):
            _check_int(name, getattr(self, name), 1)
        _check_int("max_classes", self.max_classes, 2)
        _check_int("threads", self.threads, 0)
        _check_positive("max_body_mb", self.max_body_mb)
        _check_positive("body_timeout_s", self.body_timeout_s)
        _check_positive("idempotency_cache_mb", self.idempotency_cache_mb)
        if self.rate_unit not in RATE_UNITS:
            raise ConfigError(f"rate_unit must be one of {list(RATE_UNITS)}, but got {self.rate_unit!r}.")
        if self.rate_limit is not None:
            _check_positive("rate_limit", self.rate_limit)
        if self.simulate_latency_s is not None:
            _check_positive("simulate_latency_s", self.simulate_latency_s, allow_zero=True)
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("token must be at least 8 characters long.")

    def limits(self) -> dict:
        return {k: getattr(self, k) for k in ("max_inputs", "max_text_chars", "max_text_tokens", "max_prompt_tokens",
                                              "max_classes", "max_body_mb", "max_batch_rows", "body_timeout_s",
                                              "rate_unit")} | {"max_json_elements": self.max_json_elements}

    @property
    def max_json_elements(self) -> int:
        """Values (objects, arrays, members) a body may hold: what the largest valid request needs, and room.

        Checked before a body is parsed, so that a body of many tiny values (``[{},{},...]``) is
        refused before it becomes millions of Python objects.
        """
        return 4 * self.max_inputs + 2 * self.max_classes + 4096 + 64


@dataclass
class ScoreRequest:
    template: str
    verbalizer: tuple
    prompt: np.ndarray  # (n, h) float32
    texts: list
    pairs: Optional[list]
    max_text_tokens: int

    @property
    def rows(self) -> int:
        return len(self.texts)


def _check_unicode(value: str, name: str) -> str:
    """A JSON string may carry a lone surrogate (``"\\ud800"``), which no tokenizer can encode: refuse it here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"{name} is not valid Unicode text (it holds a lone surrogate).") from None
    return value


def parse_score_request(body: Any, config: ServeConfig, hidden_size: int) -> ScoreRequest:
    """Check every field of a ``/v1/score`` body; raises :class:`WireError` naming the first bad one."""
    if not isinstance(body, dict):
        raise WireError("The body must be a JSON object.")
    unknown = set(body) - _SCORE_FIELDS
    if unknown:
        raise WireError(f"Unknown fields {sorted(unknown)}; allowed: {sorted(_SCORE_FIELDS)}.")
    missing = {"template", "verbalizer", "prompt", "inputs"} - set(body)
    if missing:
        raise WireError(f"Missing fields {sorted(missing)}.")
    template = body["template"]
    if not isinstance(template, str) or not 0 < len(template) <= 1000:
        raise WireError("template must be a string of 1 to 1000 characters.")
    _check_unicode(template, "template")
    verbalizer = body["verbalizer"]
    if (not isinstance(verbalizer, list) or not 2 <= len(verbalizer) <= config.max_classes
            or not all(isinstance(w, str) and 0 < len(w) <= 50 for w in verbalizer)):
        raise WireError(f"verbalizer must be a list of 2 to {config.max_classes} words (strings of 1 to 50 "
                        "characters).")
    for i, word in enumerate(verbalizer):
        _check_unicode(word, f"verbalizer[{i}]")
    shape = body["prompt"].get("shape") if isinstance(body["prompt"], dict) else None
    if isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) for s in shape):
        if shape[1] != hidden_size:
            raise WireError(f"prompt must have shape (n, {hidden_size}) for this model, but got {shape}.")
        if shape[0] > config.max_prompt_tokens:
            raise WireError(f"prompt has {shape[0]} tokens; the limit is {config.max_prompt_tokens}.")
    prompt = decode_array(body["prompt"], "prompt", ndim=2, max_elements=config.max_prompt_tokens * hidden_size)
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= config.max_inputs:
        raise WireError(f"inputs must be a list of 1 to {config.max_inputs} objects.")
    pair = isinstance(inputs[0], dict) and "text_pair" in inputs[0]
    texts, pairs = [], [] if pair else None
    for i, item in enumerate(inputs):
        keys = {"text", "text_pair"} if pair else {"text"}
        if not isinstance(item, dict) or set(item) != keys:
            raise WireError(f"inputs[{i}] must be an object with exactly the fields {sorted(keys)} (every input "
                            "of a request has the same fields).")
        for key in sorted(keys):
            value = item[key]
            if not isinstance(value, str) or len(value) > config.max_text_chars:
                raise WireError(f"inputs[{i}].{key} must be a string of at most {config.max_text_chars} characters.")
            _check_unicode(value, f"inputs[{i}].{key}")
        texts.append(item["text"])
        if pair:
            pairs.append(item["text_pair"])
    max_tokens = body.get("max_text_tokens", config.max_text_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= config.max_text_tokens:
        raise WireError(f"max_text_tokens must be an integer from 1 to {config.max_text_tokens}.")
    from gdfo_ray.tasks import validate_template

    validate_template(template, pair)
    return ScoreRequest(template, tuple(verbalizer), prompt, texts, pairs, max_tokens)


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
                                  req.max_text_tokens, self.config.max_rows_per_forward)
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
                prompts.append(np.broadcast_to(item.prompt, (item.rows, *item.prompt.shape)))
            merged = EncodedSplit(before, after, np.concatenate(slots))
            device = view.device
            with torch.inference_mode():
                p = torch.tensor(np.concatenate(prompts), dtype=torch.float32, device=device)
                logits = view.score(p, np.arange(len(before)), merged).cpu().numpy()
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


_EMBED_FIELDS = {"token_ids"}
# The message of each status the service answers by itself: never the exception's text, which may quote what
# the client sent (its token in a malformed header, say) or the server's internals.
_STATUS_MESSAGES = {400: "Malformed HTTP request.", 408: "The request's body did not arrive in time.",
                    413: "The request is too large.", 415: "Unsupported body encoding.",
                    431: "The request's headers are too large.", 500: "Internal error; the service logged it."}


def _json_error(status: int, message: str, headers: Optional[dict] = None):
    from aiohttp import web

    return web.json_response({"error": {"code": status, "message": message}}, status=status, headers=headers)


def _count_json_values(raw: bytes, limit: int) -> int:
    """Objects, arrays and members in a JSON text, outside its strings; stops counting past ``limit``.

    The raw counts of ``{``, ``[`` and ``,`` bound it from above and cost one pass in C; only a
    body whose raw count is over the limit has its strings stripped, to tell text from structure.
    """
    raw_count = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if raw_count <= limit:
        return raw_count
    import re

    structure = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw)
    return structure.count(b"{") + structure.count(b"[") + structure.count(b",")


def _parse_json(raw: bytes, limit: int) -> Any:
    """A request body as JSON, refused before parsing if it holds more than ``limit`` values."""
    import json

    if _count_json_values(raw, limit) > limit:
        raise _Refused(413, f"The body holds more than {limit} JSON values; no valid request needs that many.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"The body is not UTF-8 text (byte {e.start}).") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise WireError("The body is nested too deeply to be a request.") from None
    except ValueError as e:
        raise WireError(f"The body is not valid JSON: {e}.") from None


class _Refused(Exception):
    """A request refused with ``status`` and ``message`` (not a 400)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def build_app(config: ServeConfig, scorer, token: str, counts: Optional[collections.Counter] = None):
    """The aiohttp application; ``scorer`` answers (see :class:`ModelScorer`, :class:`SimulatedScorer`).

    ``counts`` are the request counters ``/v1/stats`` shows (shared with the protocol-error handler).
    """
    import hashlib

    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.web_protocol import RequestPayloadError

    info = {**scorer.info(), "limits": config.limits()}
    pacer = Pacer(config.rate_limit, config.rate_burst)
    counts = counts if counts is not None else collections.Counter()
    # Idempotency-Key -> (sha256 of the body, future of the answer, its bytes); bounded by count and by bytes.
    answers: collections.OrderedDict = collections.OrderedDict()
    cached = {"bytes": 0}
    expected = b"Bearer " + token.encode()
    # JSON is parsed on threads of its own, so that a large body never stalls the event loop (health checks).
    parse_pool = ThreadPoolExecutor(2, thread_name_prefix="gdfo-serve-parse")
    error = _json_error

    def authorized(request) -> bool:
        given = request.headers.get("Authorization", "")
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compared as the bytes the client sent.
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)

    @web.middleware
    async def guard(request, handler):
        try:
            if request.path != "/v1/health" and not authorized(request):
                counts["unauthorized"] += 1
                return error(401, "Missing or wrong bearer token (header 'Authorization: Bearer <token>').")
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                counts[f"http_{e.status}"] += 1
                return error(e.status, _STATUS_MESSAGES.get(e.status, e.reason),
                             {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None)
            raise
        except (WireError, ConfigError) as e:
            counts["bad_request"] += 1
            return error(400, str(e))
        except _Refused as e:
            counts[f"http_{e.status}"] += 1
            response = error(e.status, e.message)
            response.force_close()  # what is left of a refused body is not read
            return response
        except ConnectionError:  # the client went away mid-request: nobody to answer, nothing billed
            counts["client_disconnected"] += 1
            return error(400, "The client closed the connection before its request was read.")
        except Exception:  # the service stays up; the client learns nothing of its internals
            log.exception("request to %s failed", request.path)
            counts["server_error"] += 1
            return error(500, _STATUS_MESSAGES[500])

    async def read_body(request) -> tuple[Any, bytes]:
        """The body parsed as JSON, and its sha256; every way a body can be wrong is a 4xx."""
        limit = int(config.max_body_mb * 2**20)
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(413, f"The body declares {request.content_length} bytes; the limit is {limit}.")
        charset = request.charset
        if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise _Refused(415, "JSON bodies are UTF-8: declare charset=utf-8 or none.")
        try:
            raw = await asyncio.wait_for(request.read(), config.body_timeout_s)
        except asyncio.TimeoutError:
            raise _Refused(408, f"The body did not arrive within {config.body_timeout_s:g} s.") from None
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(413, f"The body is larger than {limit} bytes (after decompression).") from None
        except (HttpProcessingError, RequestPayloadError):  # e.g. Content-Encoding: gzip on a body that is not gzip
            raise _Refused(400, "The body could not be read as its Content-Encoding declares.") from None
        body = await asyncio.get_running_loop().run_in_executor(parse_pool, _parse_json, raw,
                                                                config.max_json_elements)
        return body, hashlib.sha256(raw).digest()

    async def expect(request):
        """The ``Expect`` header, answered before the body is sent: after the token is checked, and in the
        service's error format (aiohttp's own handler answers in plain text, and fails on bytes that are not
        ASCII)."""
        if request.version != (1, 1) or "Expect" not in request.headers:
            return None
        if request.path != "/v1/health" and not authorized(request):
            counts["unauthorized"] += 1
            response = error(401, "Missing or wrong bearer token (header 'Authorization: Bearer <token>').")
        elif request.headers["Expect"].lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper has not started
            return None
        else:
            counts["http_417"] += 1
            response = error(417, "Only 'Expect: 100-continue' is supported.")
        response.force_close()  # the body, if the client sends it anyway, is not read
        return response

    async def health(request):
        return web.json_response({"status": "ok"})

    async def get_info(request):
        return web.json_response(info)

    async def embed(request):
        body, _ = await read_body(request)
        if not isinstance(body, dict) or set(body) != _EMBED_FIELDS:
            raise WireError(f"The body must be an object with exactly the fields {sorted(_EMBED_FIELDS)}.")
        ids = body["token_ids"]
        if (not isinstance(ids, list) or not 1 <= len(ids) <= 4096
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise WireError("token_ids must be a list of 1 to 4096 integers.")
        if any(not 0 <= i < info["vocab_size"] for i in ids):
            raise WireError(f"token_ids must lie in [0, {info['vocab_size']}).")
        return web.json_response({"embeddings": encode_array(scorer.embed(ids))})

    def admit(weight: float = 1.0):
        """None if a call of ``weight`` units may start now, else the 429 to answer."""
        wait = pacer.try_acquire(time.monotonic(), weight)
        if wait > 0:
            counts["rate_limited"] += 1
            return error(429, f"Rate limit of {config.rate_limit:g} {config.rate_unit}/s exceeded.",
                         # Retry-After is whole seconds (RFC 9110); Retry-After-Ms says when, to the millisecond.
                         {"Retry-After": str(max(1, math.ceil(wait))), "Retry-After-Ms": str(math.ceil(wait * 1000))})
        if getattr(scorer, "queued", 0) >= config.max_queue:
            counts["queue_full"] += 1
            return error(429, f"The service has {config.max_queue} calls queued.", {"Retry-After": "1"})
        return None

    def weight_of(req: ScoreRequest, prepared) -> float:
        if config.rate_unit == "calls":
            return 1.0
        weight = float(req.rows if config.rate_unit == "rows" else scorer.tokens(prepared))
        if not pacer_fits(pacer, weight):
            raise _Refused(413, f"The request weighs {weight:g} {config.rate_unit}, more than the service's burst of "
                                f"{config.rate_burst}: it can never be admitted; split it.")
        return weight

    def remember(key: str, digest: bytes, future: asyncio.Future) -> None:
        answers[key] = (digest, future, 0)
        while len(answers) > config.idempotency_cache:
            _, (_, _, size) = answers.popitem(last=False)
            cached["bytes"] -= size

    def settle(key: Optional[str], logits: np.ndarray) -> None:
        """Count a finished answer's bytes against the cache, dropping the oldest beyond the bound."""
        if key is None or key not in answers:
            return
        digest, future, _ = answers[key]
        answers[key] = (digest, future, logits.nbytes)
        cached["bytes"] += logits.nbytes
        while cached["bytes"] > config.idempotency_cache_mb * 2**20 and answers:
            _, (_, _, size) = answers.popitem(last=False)
            cached["bytes"] -= size

    async def score(request):
        counts["requests"] += 1
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not 0 < len(key) <= 200:
                raise WireError("Idempotency-Key must be 1 to 200 characters.")
            _check_unicode(key, "Idempotency-Key")
        # A replay is answered from memory and takes no slot of the rate limit. Checked before the body is
        # read (a refusal costs little), and again after: the first call may have failed meanwhile.
        slot = False
        weighted = config.rate_unit != "calls"
        if not weighted and (key is None or key not in answers):
            refused = admit()
            if refused is not None:
                return refused
            slot = True
        body, digest = await read_body(request)
        req = parse_score_request(body, config, info["hidden_size"])
        if key is not None and key in answers:
            if answers[key][0] != digest:
                counts["idempotency_conflict"] += 1
                return error(422, "This Idempotency-Key was used with a different body; a retry must send the "
                                  "same body, a new call a new key.")
            counts["replayed"] += 1
            logits = await asyncio.shield(answers[key][1])
        else:
            prepared = await scorer.prepare(req)  # bad input fails here, alone, before it joins a batch
            if not slot:
                refused = admit(weight_of(req, prepared))
                if refused is not None:
                    return refused
            future = asyncio.get_running_loop().create_future()
            if key is not None:
                remember(key, digest, future)
            try:
                logits = await scorer.submit(prepared)
            except asyncio.CancelledError:
                answers.pop(key, None)
                future.cancel()
                raise
            except Exception as e:  # a replay waiting on this call gets the same error
                dropped = answers.pop(key, None)
                if dropped is not None:
                    cached["bytes"] -= dropped[2]
                future.set_exception(e)
                future.exception()  # retrieved: no "never retrieved" warning when nobody replays
                raise
            future.set_result(logits)
            settle(key, logits)
            counts["billed"] += 1
        return web.json_response({"logits": encode_array(logits), "model": info["model"]})

    async def get_stats(request):
        out = dict(counts)
        out["batches"] = getattr(scorer, "batches", 0)
        out["batched_requests"] = getattr(scorer, "batched_requests", 0)
        out["idempotency_cached"] = len(answers)
        out["idempotency_cached_bytes"] = cached["bytes"]
        return web.json_response(out)

    async def on_cleanup(app):
        scorer.close()
        parse_pool.shutdown(wait=True)

    app = web.Application(middlewares=[guard], client_max_size=int(config.max_body_mb * 2**20))
    app.add_routes([web.get("/v1/health", health, expect_handler=expect),
                    web.get("/v1/info", get_info, expect_handler=expect),
                    web.post("/v1/embed", embed, expect_handler=expect),
                    web.post("/v1/score", score, expect_handler=expect),
                    web.get("/v1/stats", get_stats, expect_handler=expect)])
    app.on_cleanup.append(on_cleanup)
    return app


def _quiet_runner(app, counts: collections.Counter):
    """An AppRunner whose protocol errors (a malformed request line or header) are answered in the service's
    error format and logged on one line, with neither the bytes the client sent nor a traceback: a header
    that carries the token must not put it in a log or echo it back."""
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

    class QuietHandler(RequestHandler):
        def handle_error(self, request, status: int = 500, exc: Optional[BaseException] = None,
                         message: Optional[str] = None):
            counts["malformed" if status < 500 else "server_error"] += 1
            log.warning("refused a malformed request from %s: %d %s", request.remote, status,
                        type(exc).__name__ if exc is not None else "")
            if request.writer.output_size > 0:
                raise ConnectionError("Response is sent already, cannot send another response")
            response = _json_error(status, _STATUS_MESSAGES.get(status, "Malformed HTTP request."))
            response.force_close()
            return response

        def log_exception(self, message: str, *args, exc_info: Optional[BaseException] = None, **kwargs) -> None:
            # aiohttp reports here what broke below the handler, e.g. the rest of a body that failed to
            # decompress after the 400 was sent: one line, the exception's type only.
            kind = type(exc_info).__name__ if isinstance(exc_info, BaseException) else "error"
            log.warning("connection from %s ended on %s", getattr(self.transport, "get_extra_info",
                                                                  lambda _: None)("peername"), kind)

    class QuietServer(web.Server):
        def __call__(self) -> RequestHandler:
            return QuietHandler(self, loop=self._loop, **self._kwargs)

    class QuietRunner(web.AppRunner):
        async def _make_server(self):
            server = await super()._make_server()
            server.__class__ = QuietServer  # the same server, building QuietHandlers for its connections
            return server

    return QuietRunner(app, access_log=None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::1")
    (True, True, False, True)
    """
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def resolve_token(config: ServeConfig) -> tuple[str, bool]:
    """The token to require, and whether it was generated here (then it must be shown once).

    A generated token is printed to the terminal, which is fine on loopback only: a service
    that others can reach must be given its token (``--token`` or ``$GDFO_SERVE_TOKEN``).
    """
    if config.token:
        return config.token, False
    if os.environ.get(TOKEN_ENV):
        if len(os.environ[TOKEN_ENV]) < 8:
            raise ConfigError(f"${TOKEN_ENV} must be at least 8 characters long.")
        return os.environ[TOKEN_ENV], False
    if not is_loopback(config.host):
        raise ConfigError(
            f"Refusing to listen on {config.host!r} without a token: every machine that reaches it could use the "
            f"model. Set ${TOKEN_ENV} (or pass --token) to a secret of at least 8 characters, or listen on "
            "127.0.0.1.")
    return secrets.token_urlsafe(24), True


class ServerHandle:
    """A service running in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, url: str, token: str, loop, runner, thread):
        self.url, self.token = url, token
        self._loop, self._runner, self._thread = loop, runner, thread

    def stats(self) -> dict:
        import requests

        return requests.get(self.url + "/v1/stats", headers={"Authorization": f"Bearer {self.token}"},
                            timeout=10).json()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _start(config: ServeConfig, scorer, token: str):
    from aiohttp import web

    counts: collections.Counter = collections.Counter()
    runner = _quiet_runner(build_app(config, scorer, token, counts), counts)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{config.host}:{port}"


def start_in_thread(config: ServeConfig, scorer=None) -> ServerHandle:
    """Start the service on its own event loop thread; returns once it accepts requests."""
    token, _ = resolve_token(config)
    scorer = scorer if scorer is not None else make_scorer(config)
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["runner"], started["url"] = loop.run_until_complete(_start(config, scorer, token))
        except BaseException as e:  # reported to the caller below
            started["error"] = e
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        # Stopped: join the loop's worker threads, so that none is left running at interpreter exit.
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=main, name="gdfo-serve", daemon=True)
    thread.start()
    ready.wait()
    if "error" in started:
        raise started["error"]
    return ServerHandle(started["url"], token, loop, started["runner"], thread)


def serve(config: ServeConfig, say=print) -> None:
    """Run the service in the foreground until interrupted."""
    token, generated = resolve_token(config)
    scorer = make_scorer(config)
    info = scorer.info()

    async def main() -> None:
        runner, url = await _start(config, scorer, token)
        say(f"[gdfo serve] {info['model']} ({info['kind']}, hidden {info['hidden_size']}) on {url}")
        if generated:
            say(f"[gdfo serve] token (set GDFO_TEACHER_TOKEN to it on the client): {token}")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        say("[gdfo serve] stopped")
