"""The aiohttp application: routes, the guard that turns every failure into a 4xx or a bare 5xx, and the
protocol-error handler that keeps a client's bytes out of logs and answers."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from gdfo_ray.exceptions import ConfigError
from gdfo_ray.ratelimit import Pacer, pacer_fits
from gdfo_ray.serve.requests import Refused, ScoreRequest, check_unicode, parse_json, parse_score_request
from gdfo_ray.serve.settings import ServeConfig
from gdfo_ray.wire import WireError, encode_array

log = logging.getLogger("gdfo_ray.serve")

_EMBED_FIELDS = {"token_ids"}
# The message of each status the service answers by itself: never the exception's text, which may quote what
# the client sent (its token in a malformed header, say) or the server's internals.
_STATUS_MESSAGES = {400: "Malformed HTTP request.", 408: "The request's body did not arrive in time.",
                    413: "The request is too large.", 415: "Unsupported body encoding.",
                    431: "The request's headers are too large.", 500: "Internal error; the service logged it."}


def _json_error(status: int, message: str, headers: Optional[dict] = None):
    from aiohttp import web

    return web.json_response({"error": {"code": status, "message": message}}, status=status, headers=headers)


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
        except Refused as e:
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
            raise Refused(413, f"The body declares {request.content_length} bytes; the limit is {limit}.")
        charset = request.charset
        if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise Refused(415, "JSON bodies are UTF-8: declare charset=utf-8 or none.")
        try:
            raw = await asyncio.wait_for(request.read(), config.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, f"The body did not arrive within {config.body_timeout_s:g} s.") from None
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"The body is larger than {limit} bytes (after decompression).") from None
        except (HttpProcessingError, RequestPayloadError):  # e.g. Content-Encoding: gzip on a body that is not gzip
            raise Refused(400, "The body could not be read as its Content-Encoding declares.") from None
        # The hash too is taken on a parse thread: for a large body it is work the event loop need not do.
        return await asyncio.get_running_loop().run_in_executor(
            parse_pool, lambda: (parse_json(raw, config.max_json_elements), hashlib.sha256(raw).digest()))

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
            raise Refused(413, f"The request weighs {weight:g} {config.rate_unit}, more than the service's burst of "
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
            check_unicode(key, "Idempotency-Key")
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

    async def validate(request):
        """A ``/v1/score`` body checked as a call would be (fields, template, verbalizer, tokenizing), not scored
        and not billed: a client finds what would be refused before it pays for anything."""
        body, _ = await read_body(request)
        req = parse_score_request(body, config, info["hidden_size"])
        await scorer.prepare(req)
        counts["validated"] += 1
        return web.json_response({"ok": True, "rows": req.rows})

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
                    web.post("/v1/validate", validate, expect_handler=expect),
                    web.get("/v1/stats", get_stats, expect_handler=expect)])
    app.on_cleanup.append(on_cleanup)
    return app


def quiet_runner(app, counts: collections.Counter, shutdown_grace_s: float = 30.0):
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

    return QuietRunner(app, access_log=None, shutdown_timeout=shutdown_grace_s)
