"""The service's settings, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gdfo_ray.config import check_int, check_positive
from gdfo_ray.exceptions import ConfigError

TOKEN_ENV = "GDFO_SERVE_TOKEN"
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
        max_tokens_per_forward: tokens per forward, padding included (as ``model.max_tokens_per_forward``).
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
        shutdown_grace_s: on SIGINT or SIGTERM, how long requests in flight may take to finish
            before their connections are cut (aiohttp's own default is 60 s).
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
    max_tokens_per_forward: Optional[int] = 2048
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
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.model is None) == (self.simulate_latency_s is None):
            raise ConfigError("Either pass a model to serve (--model) or --simulate-latency for a simulated one, "
                              "not both and not neither.")
        check_int("port", self.port, 0)
        for name in ("max_batch_rows", "max_rows_per_forward", "max_inputs", "max_text_chars", "max_text_tokens", "max_prompt_tokens",
                     "max_queue", "rate_burst", "idempotency_cache", "simulate_hidden"):
            check_int(name, getattr(self, name), 1)
        if self.max_tokens_per_forward is not None:
            check_int("max_tokens_per_forward", self.max_tokens_per_forward, 1)
        check_int("max_classes", self.max_classes, 2)
        check_int("threads", self.threads, 0)
        check_positive("max_body_mb", self.max_body_mb)
        check_positive("body_timeout_s", self.body_timeout_s)
        check_positive("idempotency_cache_mb", self.idempotency_cache_mb)
        check_positive("shutdown_grace_s", self.shutdown_grace_s, allow_zero=True)
        if self.rate_unit not in RATE_UNITS:
            raise ConfigError(f"rate_unit must be one of {list(RATE_UNITS)}, but got {self.rate_unit!r}.")
        if self.rate_limit is not None:
            check_positive("rate_limit", self.rate_limit)
        if self.simulate_latency_s is not None:
            check_positive("simulate_latency_s", self.simulate_latency_s, allow_zero=True)
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("token must be at least 8 characters long.")

    def limits(self) -> dict:
        return {k: getattr(self, k) for k in ("max_inputs", "max_text_chars", "max_text_tokens", "max_prompt_tokens",
                                              "max_classes", "max_body_mb", "max_batch_rows", "body_timeout_s",
                                              "rate_unit", "rate_burst")} | {"max_json_elements": self.max_json_elements}

    @property
    def max_json_elements(self) -> int:
        """Values (objects, arrays, members) a body may hold: what the largest valid request needs, and room.

        Checked before a body is parsed, so that a body of many tiny values (``[{},{},...]``) is
        refused before it becomes millions of Python objects.
        """
        return 4 * self.max_inputs + 2 * self.max_classes + 4096 + 64
