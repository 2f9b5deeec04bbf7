"""The client side of a black-box service: requests that fit its limits, retried with care.

Retries follow the usual contract of paid APIs: a 429 is retried when the
service's ``Retry-After-Ms`` / ``Retry-After`` says, plus jitter; a 5xx, a timeout
or a lost connection is retried with exponential backoff and full jitter; any other 4xx is the caller's fault
and fails at once with the service's message. A service that stays down past those
quick retries is an outage: the call pauses, probes ``/v1/health`` and goes on when the
service is back, for up to ``service.max_outage_s``. Every attempt of a call carries the
same ``Idempotency-Key``, so the service bills it once; the budget is charged
once by the driver before dispatch, whatever happens here. A call that still
fails raises :class:`~gdfo_ray.exceptions.TeacherError`: it is never scored.

A call on more rows than one request may carry (the service's advertised ``limits``)
goes as several requests, each with a key derived from the call's, reassembled in order.
:meth:`HttpTeacher.check` finds before the first paid call what the service would refuse.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import random
import sys
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np
import requests

from gdfo_ray.config import GDFOConfig
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.tasks import TaskData
from gdfo_ray.teachers.base import BaseTeacher, TeacherInfo
from gdfo_ray.wire import WireError, decode_array, encode_array

RETRY_STATUS = (429, 500, 502, 503, 504)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    >>> parse_retry_after("3"), parse_retry_after(None), parse_retry_after("soon")
    (3.0, None, None)
    """
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def retry_after(headers) -> Optional[float]:
    """The wait a 429/503 asks for: ``Retry-After-Ms`` when given (finer), else ``Retry-After``.

    >>> retry_after({"Retry-After": "1", "Retry-After-Ms": "40"}), retry_after({"Retry-After": "2"})
    (0.04, 2.0)
    """
    ms = headers.get("Retry-After-Ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    return parse_retry_after(headers.get("Retry-After"))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** attempt)))


class HttpTeacher(BaseTeacher):
    """A teacher behind ``gdfo serve``'s HTTP API (or any service speaking it).

    Args:
        config: the run's config (``model.teacher`` is the URL, ``service`` the client settings).
        data: the task; the texts of the requested rows are what the service scores.
        token: the bearer token; defaults to ``$<service.token_env>``.
        limiter: anything with ``acquire()`` / ``release()`` wrapped around every attempt
            (a :class:`~gdfo_ray.ratelimit.LocalLimiter`, or the pool's shared Ray limiter).
        say: where an outage is announced (default: standard error, which Ray forwards from an actor).
    """

    def __init__(self, config: GDFOConfig, data: TaskData, token: Optional[str] = None, limiter: Any = None,
                 say: Optional[Callable[[str], None]] = None):
        self.url = config.model.teacher.rstrip("/")
        self.settings = config.service
        self.token = config.service_token(token)
        self.data = data
        self.max_text_tokens = config.task.max_text_tokens
        self.n_prompt_tokens = config.prompt.n_prompt_tokens
        self.limiter = limiter
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._local = threading.local()  # one requests.Session per thread (calls_per_actor > 1)
        self._lock = threading.Lock()
        self.stats = {"calls": 0, "attempts": 0, "retries": 0, "failed": 0, "outages": 0}
        self._info: Optional[dict] = None
        self._inputs: dict = {}  # split -> (the inputs as the service takes them, their JSON sizes in bytes)
        self._outage_since: Optional[float] = None  # shared by this teacher's threads: one announcement

    # -- transport -------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
            self._local.rng = random.Random()
        return session

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _request(self, method: str, path: str, body: Optional[dict] = None, key: Optional[str] = None,
                 wait_out: bool = True) -> dict:
        """One logical call: attempts until a 200, a non-retryable answer, or the retries run out.

        A 429 that says when to come back is retried then, plus a jitter of up to the same
        wait (clients refused together do not return together); these retries are bounded by
        ``max_retry_after_s`` of waiting in all, not by ``max_retries``, since a saturated
        limit refuses many times without anything being wrong. Other failures (5xx,
        timeouts, lost connections, a 429 without a wait) use exponential backoff with full
        jitter, ``max_retries`` times; past them the service is taken to be down and, with
        ``wait_out``, the call waits for it (:meth:`_wait_for_service`) for up to
        ``max_outage_s`` from its first failure.
        """
        s = self.settings
        session = self._session()
        headers = {"Idempotency-Key": key} if key else {}
        last = "no attempt made"
        self._count("calls")
        failures, attempts, waited = 0, 0, 0.0
        first_failure: Optional[float] = None
        while True:
            self._count("attempts")
            attempts += 1
            wait, status = None, None
            if self.limiter is not None:
                self.limiter.acquire()
            try:
                response = session.request(method, self.url + path, json=body, headers=headers, timeout=s.timeout_s)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = _short_error(e)
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError as e:
                        raise TeacherError(f"{self.url}{path} answered 200 with a body that is not JSON: "
                                           f"{response.text[:200]!r}") from e
                message = _error_message(response)
                if status not in RETRY_STATUS:
                    self._count("failed")
                    raise TeacherError(f"{self.url}{path} refused the call ({status}): {message}."
                                       f"{_refusal_hint(status, s.token_env)}")
                last = f"{status}: {message}"
                wait = retry_after(response.headers)
                if wait is not None and wait > s.max_retry_after_s:
                    self._count("failed")
                    raise TeacherError(
                        f"{self.url}{path} asked to retry after {wait:.0f} s, more than service.max_retry_after_s="
                        f"{s.max_retry_after_s:g}. Either wait and resume the run (--resume) or raise that limit."
                    )
            finally:
                if self.limiter is not None:
                    self.limiter.release()
            if wait is not None and status == 429:
                pause = wait + self._local.rng.uniform(0.0, wait)
                if waited + pause > s.max_retry_after_s:
                    self._count("failed")
                    raise TeacherError(
                        f"{self.url}{path} kept answering 429 for {waited:.0f} s, more than service.max_retry_after_s="
                        f"{s.max_retry_after_s:g} of waiting. The service's rate limit is lower than the calls sent: "
                        "lower pool.calls_per_s, or resume the run later (--resume)."
                    )
                waited += pause
            else:
                first_failure = first_failure if first_failure is not None else time.monotonic()
                if failures >= s.max_retries:
                    if not wait_out or not self._wait_for_service(first_failure, last):
                        break
                    failures = 0
                    continue
                pause = max(backoff_delay(failures, s.backoff_s, s.backoff_max_s, self._local.rng), wait or 0.0)
                failures += 1
            self._count("retries")
            time.sleep(pause)
        self._count("failed")
        down = time.monotonic() - first_failure if first_failure is not None else 0.0
        outage = (f" The service did not answer for {down:.0f} s, longer than service.max_outage_s="
                  f"{s.max_outage_s:g}." if wait_out and s.max_outage_s > 0 else "")
        consequence = (" The call was charged to the budget but not scored; the run stops here and --resume repeats "
                       "the generation." if path == "/v1/score" else " Check that the service is up at this URL.")
        raise TeacherError(f"{self.url}{path} failed after {attempts} attempts (last: {last}).{outage}{consequence}")

    def _wait_for_service(self, since: float, last: str) -> bool:
        """Probe ``/v1/health`` until the service answers or ``max_outage_s`` from ``since`` has passed.

        The first thread to find the service down says so, once; the first to find it back
        says that too. Returns whether the service is back in time.
        """
        s = self.settings
        deadline = since + s.max_outage_s
        with self._lock:
            if self._outage_since is None:
                self._outage_since = since
                self.stats["outages"] += 1
                self.say(f"[gdfo] the service at {self.url} is not answering (last: {last}); the run pauses and "
                         f"waits for it, up to service.max_outage_s={s.max_outage_s:g} s")
        probe = 0
        while time.monotonic() < deadline:
            try:
                ok = requests.get(self.url + "/v1/health", timeout=min(s.timeout_s, 10.0)).status_code == 200
            except (requests.Timeout, requests.ConnectionError):
                ok = False
            if ok:
                with self._lock:
                    if self._outage_since is not None:
                        self.say(f"[gdfo] the service at {self.url} is back after "
                                 f"{time.monotonic() - self._outage_since:.0f} s; the run goes on")
                        self._outage_since = None
                return True
            pause = min(s.probe_max_s, s.backoff_s * 2.0 ** probe) * self._local.rng.uniform(0.5, 1.0)
            probe += 1
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        return False

    # -- the service's limits ------------------------------------------------------------------------
    def info(self, wait_out: bool = True) -> dict:
        if self._info is None:
            self._info = self._request("GET", "/v1/info", wait_out=wait_out)
        return self._info

    def limits(self) -> dict:
        """What one request may carry, as the service advertises it (none advertised: no limit)."""
        return dict(self.info().get("limits") or {})

    def _split_inputs(self, split: str) -> tuple[list, np.ndarray]:
        """The split's rows as the service takes them, and the bytes each adds to a body; built once."""
        cached = self._inputs.get(split)
        if cached is None:
            rows = self.data.split(split)
            if rows.text_pair is None:
                items = [{"text": t} for t in rows.text]
            else:
                items = [{"text": t, "text_pair": p} for t, p in zip(rows.text, rows.text_pair)]
            sizes = np.fromiter((len(json.dumps(item).encode()) + 2 for item in items), np.int64, len(items))
            cached = self._inputs[split] = (items, sizes)
        return cached

    def _body_room(self, n_tokens: int, hidden: int) -> float:
        """Bytes a request's inputs may take: the body limit less the prompt's base64 and the other fields."""
        max_body_mb = self.limits().get("max_body_mb")
        if max_body_mb is None:
            return float("inf")
        prompt = 4 * math.ceil(n_tokens * hidden * 4 / 3)
        return float(max_body_mb) * 2**20 - prompt - 8192

    def plan(self, split: str, example_ids: np.ndarray, n_tokens: Optional[int] = None) -> list[np.ndarray]:
        """``example_ids`` in consecutive pieces, each one request within the service's limits.

        Rows per request are capped by ``max_inputs``, ``max_batch_rows`` and, when the service
        rate-limits rows, its ``rate_burst``; bytes by ``max_body_mb``.
        """
        limits = self.limits()
        caps = [limits.get("max_inputs"), limits.get("max_batch_rows")]
        if limits.get("rate_unit") == "rows":
            caps.append(limits.get("rate_burst"))
        max_rows = int(min([c for c in caps if c] or [len(example_ids) or 1]))
        room = self._body_room(n_tokens or self.n_prompt_tokens, int(self.info()["hidden_size"]))
        ids = np.asarray(example_ids)
        sizes = self._split_inputs(split)[1][ids] if len(ids) else np.zeros(0, np.int64)
        if room == float("inf") or sizes.sum() <= room:
            return [ids[i:i + max_rows] for i in range(0, len(ids), max_rows)] or [ids]
        pieces, start, used = [], 0, 0
        for j, size in enumerate(sizes.tolist()):
            if j > start and (j - start == max_rows or used + size > room):
                pieces.append(ids[start:j])
                start, used = j, 0
            used += size
        pieces.append(ids[start:])
        return pieces

    # -- before the first paid call --------------------------------------------------------------------
    def check(self) -> None:
        """Refuse now what the service would refuse later: after the budget is spent is too late.

        Reads ``/v1/info`` (a wrong token fails here), compares the task and the prompt with the
        advertised limits, and has the service check the template and verbalizer on one row
        (``/v1/validate``, free) where it offers that route.
        """
        info = self.info(wait_out=False)
        limits, spec = dict(info.get("limits") or {}), self.data.spec
        fix = "Change that setting, or ask the service for a higher limit."

        def over(setting: str, value: int, limit_name: str) -> None:
            limit = limits.get(limit_name)
            if limit is not None and value > limit:
                raise TeacherError(f"{setting}={value} is over the service's {limit_name}={limit}, so every call "
                                   f"would be refused. {fix}")

        over("task.max_text_tokens", self.max_text_tokens, "max_text_tokens")
        over("prompt.n_prompt_tokens", self.n_prompt_tokens, "max_prompt_tokens")
        limit = limits.get("max_classes")
        if limit is not None and spec.n_classes > limit:
            raise TeacherError(f"Task {spec.name!r} has {spec.n_classes} classes; the service scores at most "
                               f"{limit} (its max_classes).")
        limit = limits.get("max_text_chars")
        if limit is not None:
            for split in ("train", "dev", "test"):
                rows = self.data.split(split)
                for field, texts in (("text", rows.text), ("text_pair", rows.text_pair or [])):
                    longest = max(range(len(texts)), key=lambda i: len(texts[i]), default=None)
                    if longest is not None and len(texts[longest]) > limit:
                        raise TeacherError(
                            f"Row {longest} of the {split} split has a {field} of {len(texts[longest])} characters; "
                            f"the service takes at most {limit} (its max_text_chars), and no split of a call can "
                            f"fit one input. Set task.max_text_chars={limit} to cut texts to that length, or "
                            "ask the service for a higher limit."
                        )
        hidden = int(info["hidden_size"])
        room = self._body_room(self.n_prompt_tokens, hidden)
        if room <= 0:
            raise TeacherError(f"A prompt of {self.n_prompt_tokens} tokens of {hidden} floats does not fit the "
                               f"service's max_body_mb={limits.get('max_body_mb')}: lower prompt.n_prompt_tokens.")
        for split in ("train", "dev", "test"):
            items, sizes = self._split_inputs(split)
            if len(items) and room < sizes.max():
                raise TeacherError(f"One input of the {split} split takes {sizes.max()} bytes, more than a request "
                                   f"to the service may hold beside the prompt (max_body_mb="
                                   f"{limits.get('max_body_mb')}): set task.max_text_chars lower.")
        items = self._split_inputs("train")[0]
        body = {"template": spec.template_for(info["kind"]), "verbalizer": list(spec.verbalizer),
                "prompt": encode_array(np.zeros((self.n_prompt_tokens, hidden), np.float32)),
                "inputs": items[:1], "max_text_tokens": self.max_text_tokens}
        try:
            self._request("POST", "/v1/validate", body, wait_out=False)
        except TeacherError as e:
            if "(404)" not in str(e):  # a service without the route checks at the first call instead
                raise TeacherError(f"The service refuses this task's calls, so the run stops before paying for "
                                   f"any: {e}") from e

    # -- the teacher interface -----------------------------------------------------------------------
    def describe(self) -> TeacherInfo:
        info = self.info()
        return TeacherInfo(info["model"], int(info["hidden_size"]), float(info["embedding_std"]),
                           int(info["vocab_size"]), self.data.spec.n_classes, str(info.get("dtype", "unknown")))

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        answer = self._request("POST", "/v1/embed", {"token_ids": [int(i) for i in ids]})
        return _decode(answer, "embeddings", self.url)

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        """One call per prompt; a call on more rows than a request may carry goes as several requests."""
        spec = self.data.spec
        template = spec.template_for(self.info()["kind"])
        if np.ndim(prompts) == 4:
            raise TeacherError(
                f"The service at {self.url} takes input-embedding prompts only, not per-layer prompts (method "
                "'bbtv2'). Use a method that prompts the input (bbt, gdfo), or a local teacher model."
            )
        prompts = np.asarray(prompts, dtype=np.float32)
        ids = np.asarray(example_ids)
        call_ids = list(call_ids) if call_ids is not None else [uuid.uuid4().hex for _ in range(len(prompts))]
        items = self._split_inputs(split)[0]
        pieces = self.plan(split, ids, prompts.shape[1] if prompts.ndim == 3 else None)
        out = []
        for prompt, key in zip(prompts, call_ids):
            encoded, parts = encode_array(prompt), []
            for j, piece in enumerate(pieces):
                body = {"template": template, "verbalizer": list(spec.verbalizer), "prompt": encoded,
                        "inputs": [items[i] for i in piece.tolist()], "max_text_tokens": self.max_text_tokens}
                answer = self._request("POST", "/v1/score", body, key=piece_key(key, j, len(pieces)))
                logits = _decode(answer, "logits", self.url)
                if logits.shape != (len(piece), spec.n_classes):
                    raise TeacherError(f"{self.url} returned logits of shape {logits.shape}, expected "
                                       f"{(len(piece), spec.n_classes)}.")
                parts.append(logits)
            out.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return np.stack(out) if out else np.zeros((0, len(ids), spec.n_classes), np.float32)

    def get_stats(self) -> dict:
        with self._lock:
            return dict(self.stats)


def piece_key(call_id: str, index: int, n_pieces: int) -> str:
    """The idempotency key of piece ``index`` of a call sent as ``n_pieces`` requests: the call's own when
    it is one request, else derived from it, so that a piece sent again is billed once.

    >>> piece_key("c1", 0, 1), piece_key("c1", 1, 3)
    ('c1', 'c1.2of3')
    """
    if n_pieces == 1:
        return call_id
    key = f"{call_id}.{index + 1}of{n_pieces}"
    return key if len(key) <= 200 else hashlib.sha256(key.encode()).hexdigest()


def _short_error(error: Exception) -> str:
    """A transport error in a line: its type and the operating system's reason where it names one.

    >>> _short_error(ConnectionError("HTTPConnectionPool(...): Max retries exceeded ([Errno 111] Connection refused)"))
    'ConnectionError: [Errno 111] Connection refused'
    """
    import re

    reason = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(error))
    return f"{type(error).__name__}: {reason.group(0).strip() if reason else str(error)[:200]}"


def _refusal_hint(status: int, token_env: str) -> str:
    if status in (401, 403):
        return f" Check ${token_env}: it must hold the service's token."
    if status == 413:
        return " The request was larger than the service takes; its advertised limits (/v1/info) may be wrong."
    return ""


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason or "no message"


def _decode(answer: dict, field: str, url: str) -> np.ndarray:
    try:
        return decode_array(answer.get(field), field)
    except (WireError, AttributeError) as e:
        raise TeacherError(f"{url} sent an answer without a valid {field!r}: {e}") from e
