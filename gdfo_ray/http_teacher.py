"""The client side of a black-box service: one HTTP request per call, retried with care.

Retries follow the usual contract of paid APIs: a 429 is retried when the
service's ``Retry-After-Ms`` / ``Retry-After`` says, plus jitter; a 5xx, a timeout
or a lost connection is retried with exponential backoff and full jitter; any other 4xx is the caller's fault
and fails at once with the service's message. Every attempt of a call carries the
same ``Idempotency-Key``, so the service bills it once; the budget is charged
once by the driver before dispatch, whatever happens here. A call that still
fails raises :class:`~gdfo_ray.exceptions.TeacherError`: it is never scored.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
import uuid
from typing import Any, Optional, Sequence

import numpy as np
import requests

from gdfo_ray.config import GDFOConfig
from gdfo_ray.exceptions import TeacherError
from gdfo_ray.tasks import TaskData
from gdfo_ray.teacher import BaseTeacher, TeacherInfo
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
    """

    def __init__(self, config: GDFOConfig, data: TaskData, token: Optional[str] = None, limiter: Any = None):
        self.url = config.model.teacher.rstrip("/")
        self.settings = config.service
        self.token = config.service_token(token)
        self.data = data
        self.max_text_tokens = config.task.max_text_tokens
        self.limiter = limiter
        self._local = threading.local()  # one requests.Session per thread (calls_per_actor > 1)
        self._lock = threading.Lock()
        self.stats = {"calls": 0, "attempts": 0, "retries": 0, "failed": 0}
        self._info: Optional[dict] = None

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

    def _request(self, method: str, path: str, body: Optional[dict] = None, key: Optional[str] = None) -> dict:
        """One logical call: attempts until a 200, a non-retryable answer, or the retries run out.

        A 429 that says when to come back is retried then, plus a jitter of up to the same
        wait (clients refused together do not return together); these retries are bounded by
        ``max_retry_after_s`` of waiting in all, not by ``max_retries``, since a saturated
        limit refuses many times without anything being wrong. Other failures (5xx,
        timeouts, lost connections, a 429 without a wait) use exponential backoff with full
        jitter, ``max_retries`` times at most.
        """
        s = self.settings
        session = self._session()
        headers = {"Idempotency-Key": key} if key else {}
        last = "no attempt made"
        self._count("calls")
        failures, waited = 0, 0.0
        while True:
            self._count("attempts")
            wait, status = None, None
            if self.limiter is not None:
                self.limiter.acquire()
            try:
                response = session.request(method, self.url + path, json=body, headers=headers, timeout=s.timeout_s)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
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
                    hint = (f" Check ${s.token_env}: it must hold the service's token."
                            if status in (401, 403) else "")
                    raise TeacherError(f"{self.url}{path} refused the call ({status}): {message}.{hint}")
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
                if failures >= s.max_retries:
                    break
                pause = max(backoff_delay(failures, s.backoff_s, s.backoff_max_s, self._local.rng), wait or 0.0)
                failures += 1
            self._count("retries")
            time.sleep(pause)
        self._count("failed")
        raise TeacherError(
            f"{self.url}{path} failed after {failures + 1} attempts (last: {last}). The call was charged to "
            "the budget but not scored; the run stops here and --resume repeats the generation."
        )

    # -- the teacher interface -----------------------------------------------------------------------
    def info(self) -> dict:
        if self._info is None:
            self._info = self._request("GET", "/v1/info")
        return self._info

    def describe(self) -> TeacherInfo:
        info = self.info()
        return TeacherInfo(info["model"], int(info["hidden_size"]), float(info["embedding_std"]),
                           int(info["vocab_size"]), self.data.spec.n_classes, str(info.get("dtype", "unknown")))

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        answer = self._request("POST", "/v1/embed", {"token_ids": [int(i) for i in ids]})
        return _decode(answer, "embeddings", self.url)

    def query(self, prompts: np.ndarray, split: str, example_ids: np.ndarray,
              call_ids: Optional[Sequence[str]] = None) -> np.ndarray:
        spec, rows = self.data.spec, self.data.split(split)
        template = spec.template_for(self.info()["kind"])
        inputs = []
        for i in np.asarray(example_ids).tolist():
            item = {"text": rows.text[i]}
            if rows.text_pair is not None:
                item["text_pair"] = rows.text_pair[i]
            inputs.append(item)
        if np.ndim(prompts) == 4:
            raise TeacherError(
                f"The service at {self.url} takes input-embedding prompts only, not per-layer prompts (method "
                "'bbtv2'). Use a method that prompts the input (bbt, gdfo), or a local teacher model."
            )
        call_ids = list(call_ids) if call_ids is not None else [uuid.uuid4().hex for _ in range(len(prompts))]
        out = []
        for prompt, key in zip(np.asarray(prompts, dtype=np.float32), call_ids):
            body = {"template": template, "verbalizer": list(spec.verbalizer), "prompt": encode_array(prompt),
                    "inputs": inputs, "max_text_tokens": self.max_text_tokens}
            logits = _decode(self._request("POST", "/v1/score", body, key=key), "logits", self.url)
            if logits.shape != (len(inputs), spec.n_classes):
                raise TeacherError(f"{self.url} returned logits of shape {logits.shape}, expected "
                                   f"{(len(inputs), spec.n_classes)}.")
            out.append(logits)
        return np.stack(out) if out else np.zeros((0, len(inputs), spec.n_classes), np.float32)

    def get_stats(self) -> dict:
        with self._lock:
            return dict(self.stats)


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
