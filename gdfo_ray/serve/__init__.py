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
- ``POST /v1/validate``: a ``/v1/score`` body checked (template, verbalizer, inputs) but neither
  scored nor billed: ``{"ok": true, "rows": B}``, or the 4xx the call would get.
- ``GET /v1/stats``: requests, billed calls, 429s, batches.

A bad request gets a 4xx with ``{"error": {"code", "message"}}``; over the rate
limit or with a full queue, a 429 with ``Retry-After`` (whole seconds) and ``Retry-After-Ms``.

The package is split by role: ``settings`` (:class:`ServeConfig`), ``requests`` (reading and
checking bodies), ``scorers`` (the model and its batching), ``app`` (routes and error handling) and
``lifecycle`` (token, start, stop).
"""

from gdfo_ray.serve.app import build_app
from gdfo_ray.serve.lifecycle import (ServerHandle, is_loopback, resolve_token, serve, start_in_thread,
                                      wait_until_healthy)
from gdfo_ray.serve.requests import ScoreRequest, parse_score_request
from gdfo_ray.serve.scorers import ModelScorer, SimulatedScorer, make_scorer
from gdfo_ray.serve.settings import RATE_UNITS, TOKEN_ENV, ServeConfig

__all__ = ["RATE_UNITS", "TOKEN_ENV", "ModelScorer", "ScoreRequest", "ServeConfig", "ServerHandle", "SimulatedScorer",
           "build_app", "is_loopback", "make_scorer", "parse_score_request", "resolve_token", "serve",
           "start_in_thread", "wait_until_healthy"]
