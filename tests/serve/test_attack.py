"""gdfo serve against what an attacker sends: raw bytes and headers over a socket, not only JSON.

Every request gets a 2xx or a 4xx in the documented error format, never a 5xx; a request that
fails in a batched forward fails alone; the token never reaches a log line or a response.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdfo_ray.serve import ServeConfig, build_app, start_in_thread
from gdfo_ray.wire import encode_array

TOKEN = "attack-test-token-8c1f"
HIDDEN = 32
FUZZ_EXAMPLES = int(os.environ.get("GDFO_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def service(tiny_models):
    config = ServeConfig(model=tiny_models["causal"], port=0, token=TOKEN, threads=1, dtype="float32",
                         max_inputs=16, max_text_chars=200, max_prompt_tokens=8, max_body_mb=0.5,
                         body_timeout_s=1.0, idempotency_cache_mb=0.0001)
    with start_in_thread(config) as handle:
        yield handle


def _body(texts=("the movie was good", "it was awful"), seed=0, n=2, template="{prompt} {text} It was {mask}"):
    prompt = np.random.default_rng(seed).normal(size=(n, HIDDEN)).astype(np.float32)
    return {"template": template, "verbalizer": ["bad", "great"], "prompt": encode_array(prompt),
            "inputs": [{"text": t} for t in texts]}


def _raw(service, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``data`` as it is; returns (status, whole response) or (0, b"") if the server closed without one."""
    url = urlparse(service.url)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(data)  # the write side stays open: a closed one reads as a client that went away
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    response = b"".join(chunks)
    if not response.startswith(b"HTTP/1."):
        return 0, response
    return int(response.split(b" ", 2)[1]), response


def _request(path: str, body: bytes = b"", headers: dict | None = None, method: str = "POST",
             auth: bytes | None = b"Bearer " + TOKEN.encode()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: localhost", b"Connection: close"]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    for k, v in (headers or {}).items():
        lines.append((k.encode() if isinstance(k, str) else k) + b": " + (v.encode() if isinstance(v, str) else v))
    if method == "POST" and not any(k.lower() == "content-length" for k in map(str, (headers or {}))):
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _json_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def _client_error(status: int, response: bytes) -> dict:
    assert 400 <= status < 500, response[:300]
    error = _json_of(response)["error"]
    assert error["code"] == status and error["message"]
    return error


def _score(service, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    return _raw(service, _request("/v1/score", json.dumps(body).encode(), headers))


def test_a_header_that_is_not_utf8_is_refused_as_unauthorized_not_500(service):
    before = service.stats().get("unauthorized", 0)
    for auth in (b"Bearer \xff\xfe", b"Bearer " + TOKEN.encode() + b"\xff", b"\xc3\x28"):
        status, response = _raw(service, _request("/v1/info", method="GET", auth=auth))
        assert _client_error(status, response)["code"] == 401
    assert service.stats()["unauthorized"] == before + 3


@pytest.mark.parametrize("body, field", [
    (_body(texts=("fine", "\ud800")), "inputs[1].text"),
    ({**_body(), "template": "{prompt} {text} \udfff was {mask}"}, "template"),
    ({**_body(), "verbalizer": ["bad", "gr\ud83deat"]}, "verbalizer[1]"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(service, body, field):
    data = json.dumps(body).encode()  # json writes the lone surrogate as a \\ud800 escape, as an attacker would
    status, response = _raw(service, _request("/v1/score", data))
    assert field in _client_error(status, response)["message"]


def test_hostile_bodies_and_encodings_are_4xx(service, caplog):
    caplog.set_level(logging.DEBUG)
    deep = b"[" * 1000 + b"]" * 1000
    cases = [
        (_request("/v1/score", deep), 400, "nested too deeply"),
        (_request("/v1/score", json.dumps(_body()).encode(), {"Content-Type": "application/json; charset=klingon"}),
         415, "UTF-8"),
        (_request("/v1/score", b"definitely not gzip", {"Content-Encoding": "gzip"}), 400, "Content-Encoding"),
        (_request("/v1/score", b"\xff\xfe{}"), 400, "not UTF-8"),
        (_request("/v1/score", b"{}", {"Content-Length": str(10**12)}), 413, "declares"),
        (_request("/v1/embed", json.dumps({"token_ids": [1], "extra": 1}).encode()), 400, "exactly the fields"),
        (_request("/v1/score", b"[" + b"{}," * 20_000 + b"{}]"), 413, "JSON values"),
    ]
    for data, status, words in cases:
        got, response = _raw(service, data)
        assert got == status and words in _client_error(got, response)["message"], response[:300]
    # A body compressed as declared is read.
    got, response = _raw(service, _request("/v1/score", gzip.compress(json.dumps(_body()).encode()),
                                          {"Content-Encoding": "gzip"}))
    assert got == 200, response[:300]
    time.sleep(0.2)  # what aiohttp reports after an answer (the rest of a broken body) is logged too
    assert not any(r.exc_info for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_expect_is_answered_after_the_token_and_in_the_error_format(service):
    for value in (b"\x80", b"!", b"102-processing"):
        status, response = _raw(service, _request("/v1/score", b"{}", {"Expect": value}))
        assert _client_error(status, response)["code"] == 417
    status, response = _raw(service, _request("/v1/score", b"{}", {"Expect": "100-continue"}, auth=b"Bearer nope"))
    assert _client_error(status, response)["code"] == 401 and b"100 Continue" not in response
    status, response = _raw(service, _request("/v1/score", json.dumps(_body()).encode(), {"Expect": "100-continue"}))
    assert status == 100 and b"HTTP/1.1 200 OK" in response  # 100 Continue, then the answer


def test_a_body_that_never_arrives_times_out_with_408(service):
    data = _request("/v1/score", b'{"templ', {"Content-Length": "100"})
    url = urlparse(service.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(data)
        t0 = time.monotonic()
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5


def test_a_request_that_fails_in_a_batched_forward_fails_alone(tiny_models, service):
    # The real case first: a prompt of no tokens and an empty text leaves a causal LM nothing to read.
    empty = _body(texts=("",), n=0, template="{prompt}{text}{mask}")
    status, response = _score(service, empty)
    assert "no token to read" in _client_error(status, response)["message"]
    # Then any failure inside a forward: requests sent at once share it, and only the poisoned one fails.
    from gdfo_ray.serve import ModelScorer

    config = ServeConfig(model=tiny_models["causal"], port=0, token=TOKEN, threads=1, dtype="float32")
    scorer = ModelScorer(config)
    real_forward = scorer._forward
    forwards = []

    def forward(batch):
        forwards.append(len(batch))
        time.sleep(0.3)  # let the others queue behind the first, into one batch
        if any(float(item.prompt[0, 0]) == 123.0 for item in batch):
            raise RuntimeError("poisoned")
        return real_forward(batch)

    scorer._forward = forward
    with start_in_thread(config, scorer=scorer) as alone:
        bodies = [_body(seed=i) for i in range(6)]
        poisoned = np.zeros((2, HIDDEN), np.float32)
        poisoned[0, 0] = 123.0
        bodies[3]["prompt"] = encode_array(poisoned)
        results = [None] * len(bodies)

        def send(i):
            results[i] = _score(alone, bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join()
    assert max(forwards) > 1  # the poisoned request did share a forward with good ones
    assert [s for s, _ in results] == [200, 200, 200, 500, 200, 200]
    assert _json_of(results[3][1])["error"]["message"] == "Internal error; the service logged it."
    assert b"poisoned" not in results[3][1] and b"RuntimeError" not in results[3][1]


def test_an_idempotency_key_is_bound_to_its_body_and_the_cache_to_its_bytes(service):
    key = {"Idempotency-Key": "call-bound-1"}
    first, _ = _score(service, _body(seed=1), key)
    again, response = _score(service, _body(seed=1), key)
    other, conflict = _score(service, _body(seed=2), key)
    assert (first, again, other) == (200, 200, 422)
    assert "different body" in _client_error(other, conflict)["message"]
    for i in range(20):  # 105 bytes of answers at most (16 each): older keys are dropped
        _score(service, _body(seed=i), {"Idempotency-Key": f"fill-{i}"})
    stats = service.stats()
    assert 0 < stats["idempotency_cached_bytes"] <= 0.0001 * 2**20 and stats["idempotency_cached"] == 6


def test_the_rate_limit_can_weigh_a_call_by_its_rows():
    config = ServeConfig(simulate_latency_s=0.0, port=0, token=TOKEN, rate_limit=0.5, rate_burst=4, rate_unit="rows")
    with start_in_thread(config) as svc:
        three = _body(texts=("a b", "c d", "e f"))
        three["prompt"] = encode_array(np.zeros((2, 64), np.float32))
        assert _score(svc, three)[0] == 200
        status, response = _score(svc, three)  # 3 + 3 rows > a burst of 4
        assert status == 429 and b"rows/s" in response
        five = {**three, "inputs": [{"text": "x"}] * 5}
        status, response = _score(svc, five)
        assert "can never be admitted" in _client_error(status, response)["message"]


def test_the_rate_limit_can_weigh_a_call_by_the_tokens_the_model_reads(tiny_models):
    config = ServeConfig(model=tiny_models["causal"], port=0, token=TOKEN, threads=1, dtype="float32",
                         rate_limit=1.0, rate_burst=40, rate_unit="tokens")
    with start_in_thread(config) as svc:
        short = _body(texts=("good",))  # 2 prompt tokens + "good It was" (+ BOS): under 40
        assert _score(svc, short)[0] == 200
        long = _body(texts=(" ".join(["the movie was good"] * 12),))
        status, response = _score(svc, long)
        message = _client_error(status, response)["message"]
        assert status == 413 and "tokens, more than the service's burst of 40" in message
        weight = float(message.split("weighs ")[1].split(" tokens")[0])
        assert 48 + 2 <= weight <= 48 + 2 + 5  # its 48 words, 2 prompt tokens, the template's few


MALFORMED = [
    b"Authorization: Bearer " + TOKEN.encode() + b"\r",  # a token read from a file with a Windows line ending
    b"Authorization: Bearer " + TOKEN.encode() + b"\x00",
    b"Authorization: Bearer " + TOKEN.encode() + b"\x7f\x01",
    b"X-" + TOKEN.encode() + b"\x01: 1",
    b"Authorization : Bearer " + TOKEN.encode(),
    b"Authorization: Bearer " + TOKEN.encode() + b"\r\n continued",
]


@pytest.mark.parametrize("header", MALFORMED)
def test_the_token_never_reaches_a_log_line_or_a_response(service, caplog, header):
    caplog.set_level(logging.DEBUG)
    data = b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    status, response = _raw(service, data)
    assert 400 <= status < 500 or status == 0, response[:200]
    if status:
        _client_error(status, response)
    logged = "\n".join(r.getMessage() + (str(r.exc_info) if r.exc_info else "") for r in caplog.records)
    for part in (TOKEN, TOKEN[:8], TOKEN[-8:]):
        assert part not in logged and part.encode() not in response
    assert "Traceback" not in logged and not any(r.exc_info for r in caplog.records)
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1  # one line per request


def test_health_answers_while_a_large_hostile_body_arrives(tiny_models):
    config = ServeConfig(simulate_latency_s=0.0, port=0, token=TOKEN, max_body_mb=64.0)
    with start_in_thread(config) as svc:
        big = b"[" + b"{}," * (20 * 2**20 // 3) + b"{}]"  # 20 MB of tiny values
        result = {}
        sender = threading.Thread(target=lambda: result.update(r=_raw(svc, _request("/v1/score", big), timeout=60)))
        sender.start()
        latencies = []
        while sender.is_alive():
            t0 = time.monotonic()
            status, _ = _raw(svc, _request("/v1/health", method="GET", auth=None))
            latencies.append(time.monotonic() - t0)
            assert status == 200
        sender.join()
        assert result["r"][0] == 413
        assert max(latencies) < 1.0, latencies


# Byte-level fuzzing: request lines, header names and values of arbitrary bytes, charsets, encodings,
# nesting and declared lengths that lie. Every answer is a 4xx (or 2xx), never a 5xx.
_header_bytes = st.binary(min_size=0, max_size=40)
_names = st.sampled_from([b"Authorization", b"Content-Type", b"Content-Encoding", b"Content-Length",
                          b"Idempotency-Key", b"Transfer-Encoding", b"Expect"]) | _header_bytes
_values = st.one_of(
    _header_bytes,
    st.sampled_from([b"Bearer " + TOKEN.encode(), b"application/json; charset=utf-16", b"gzip", b"br", b"deflate",
                     b"chunked", b"100-continue", b"-1", b"99999999999999999999", b"1e3", b"0x10"]),
    st.binary(max_size=10).map(lambda b: b"Bearer " + TOKEN.encode() + b),
)
_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(json.dumps(_body()).encode()),
    st.just(b"\xef\xbb\xbf" + json.dumps(_body()).encode()),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from([b"POST", b"GET", b"PUT", b"P\x00ST", b"\xff"]),
       path=st.sampled_from([b"/v1/score", b"/v1/embed", b"/v1/validate", b"/v1/info", b"/v1/health", b"/v1/\xff",
                             b"/%00"]),
       headers=st.lists(st.tuples(_names, _values), max_size=5), body=_bodies,
       length=st.sampled_from(["true", "less", "more", "none"]))
def test_raw_requests_get_no_5xx(service, caplog, method, path, headers, body, length):
    caplog.set_level(logging.DEBUG)
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: x", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if length != "none":
        declared = {"true": len(body), "less": max(0, len(body) - 3), "more": len(body) + 5}[length]
        lines.append(b"Content-Length: " + str(declared).encode())
    status, response = _raw(service, b"\r\n".join(lines) + b"\r\n\r\n" + body, timeout=15)
    assert status < 500, response[:300]
    if status >= 400:
        _client_error(status, response)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and TOKEN.encode() not in response.split(b"\r\n\r\n", 1)[-1]
    assert not any(r.exc_info for r in caplog.records)


def test_after_the_fuzzing_no_server_error_was_counted_and_it_still_serves(service):
    assert service.stats().get("server_error", 0) == 0
    assert _score(service, _body())[0] == 200


def test_build_app_takes_the_counters_it_shares():
    import collections

    from gdfo_ray.serve import SimulatedScorer

    config = ServeConfig(simulate_latency_s=0.0, port=0, token=TOKEN)
    counts = collections.Counter()
    build_app(config, SimulatedScorer(config), TOKEN, counts)
    assert counts == collections.Counter()
