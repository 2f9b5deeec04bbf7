"""gdfo serve under generated garbage (Hypothesis): every bad request is a 4xx in the documented
error format, never a 5xx or a crash, and a valid request afterwards still succeeds.

The number of cases per property is ``FUZZ_EXAMPLES`` (env ``GDFO_FUZZ_EXAMPLES`` raises it
for a longer fuzzing session); each test asserts that its cases ran.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import string
import time

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdfo_ray.wire import encode_array

TOKEN = "test-token-123"  # tests/conftest.py's SERVICE_TOKEN
HIDDEN = 32
FUZZ_EXAMPLES = int(os.environ.get("GDFO_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def service(tiny_service):
    return tiny_service


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        yield s


def _valid_body(seed: int = 0) -> dict:
    prompt = np.random.default_rng(seed).normal(size=(2, HIDDEN)).astype(np.float32)
    return {"template": "{prompt} {text} It was {mask}", "verbalizer": ["bad", "great"],
            "prompt": encode_array(prompt), "inputs": [{"text": "the movie was good"}, {"text": "it was awful"}]}


def _post(http, service, body, path="/v1/score", token=TOKEN, headers=None):
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    return http.post(service.url + path, data=data, headers=headers, timeout=30)


def _assert_client_error(r) -> None:
    """A 4xx whose body is the README's ``{"error": {"code", "message"}}``."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["code"] == r.status_code and isinstance(err["message"], str) and err["message"]


def _assert_still_serves(http, service) -> None:
    r = _post(http, service, _valid_body())
    assert r.status_code == 200, r.text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
_FIELDS = ("template", "verbalizer", "prompt", "inputs", "max_text_tokens")


class Counter:
    def __init__(self):
        self.n = 0


@pytest.fixture
def counted(request):
    c = Counter()
    yield c
    print(f"\n{request.node.name}: {c.n} cases")  # shown with -s
    assert c.n >= min(FUZZ_EXAMPLES, 20), f"only {c.n} cases ran"


def test_random_json_documents_are_refused(service, http, counted):
    @FUZZ
    @given(body=json_values, path=st.sampled_from(["/v1/score", "/v1/embed", "/v1/validate"]))
    def check(body, path):
        counted.n += 1
        _assert_client_error(_post(http, service, body, path))

    check()
    _assert_still_serves(http, service)


def test_bytes_that_are_not_json_are_refused(service, http, counted):
    @FUZZ
    @given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
    def check(raw):
        counted.n += 1
        try:
            json.loads(raw)
            return  # valid JSON is another test's business
        except ValueError:
            pass
        r = _post(http, service, raw)
        _assert_client_error(r)
        assert r.status_code == 400

    check()
    _assert_still_serves(http, service)


def test_a_valid_body_with_one_field_replaced_by_garbage_is_refused(service, http, counted):
    @FUZZ
    @given(field=st.sampled_from(_FIELDS), value=json_values)
    def check(field, value):
        counted.n += 1
        body = {**_valid_body(), field: value}
        r = _post(http, service, body)
        if r.status_code == 200:  # garbage that happens to be valid (max_text_tokens=3, say) is fine
            return
        _assert_client_error(r)

    check()
    _assert_still_serves(http, service)


def _array(dtype, shape, values=None, data=None):
    if data is None:
        count = int(np.prod(shape)) if shape else 1
        arr = np.asarray(values if values is not None else np.zeros(count), dtype=np.dtype(dtype).newbyteorder("<"))
        data = base64.b64encode(arr.tobytes()).decode()
    return {"dtype": dtype, "shape": shape, "data": data}


special_floats = st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 0.0, 1e-45])


def test_prompts_of_wrong_dtype_shape_size_or_values_are_refused(service, http, counted):
    shapes = st.lists(st.integers(min_value=-2, max_value=70000), max_size=4)
    arrays = st.one_of(
        # a wrong dtype name (valid names with the wrong bytes are caught by the size check)
        st.builds(lambda d, s: {"dtype": d, "shape": s, "data": ""},
                  st.text(max_size=10).filter(lambda d: d not in ("float32", "float16")), shapes),
        # shapes: wrong rank, wrong hidden size, too many tokens, empty, huge, negative
        st.builds(lambda s: _array("float32", [max(x, 0) for x in s] if all(x >= 0 for x in s) else s,
                                   data=base64.b64encode(b"\0" * 16).decode()), shapes),
        st.builds(lambda n: _array("float32", [n, HIDDEN]), st.sampled_from([9, 100, 5000])),  # 0 tokens is the manual prompt: valid
        # the right shape with NaN / inf in it (float32 and float16)
        st.builds(lambda d, v, i: _array(d, [2, HIDDEN], np.where(np.arange(2 * HIDDEN) == i, v, 0.0)),
                  st.sampled_from(["float32", "float16"]), special_floats.filter(lambda v: not math.isfinite(v)),
                  st.integers(0, 2 * HIDDEN - 1)),
        # bad base64 and truncated payloads
        st.builds(lambda t: _array("float32", [2, HIDDEN], data=t), st.text(max_size=60)),
        st.builds(lambda k: _array("float32", [2, HIDDEN], data=base64.b64encode(b"\1" * k).decode()),
                  st.integers(0, 300).filter(lambda k: k != 2 * HIDDEN * 4)),
    )

    @FUZZ
    @given(prompt=arrays)
    def check(prompt):
        counted.n += 1
        r = _post(http, service, {**_valid_body(), "prompt": prompt})
        _assert_client_error(r)

    check()
    _assert_still_serves(http, service)


def test_unicode_templates_verbalizers_and_texts_get_an_answer_or_a_4xx(service, http, counted):
    words = st.text(min_size=1, max_size=12)

    @FUZZ
    @given(pre=st.text(max_size=30), mid=st.text(max_size=30), text=st.text(max_size=220),
           verbalizer=st.lists(words, min_size=0, max_size=5) | st.just(["bad", "great"]),
           pair=st.booleans())
    def check(pre, mid, text, verbalizer, pair):
        counted.n += 1
        slots = "{prompt} {text} {text_pair}" if pair else "{prompt} {text}"
        body = {**_valid_body(), "template": f"{pre}{slots}{mid}{{mask}}", "verbalizer": verbalizer,
                "inputs": [{"text": text, "text_pair": text[::-1]} if pair else {"text": text}]}
        r = _post(http, service, body)
        if r.status_code != 200:
            _assert_client_error(r)

    check()
    _assert_still_serves(http, service)


def test_missing_and_wrong_tokens_are_401(service, http, counted):
    printable = st.text(alphabet=string.ascii_letters + string.digits + "-_.~+/= ", max_size=40)

    @FUZZ
    @given(token=st.none() | printable.filter(lambda t: t != TOKEN),
           scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "]),
           path=st.sampled_from(["/v1/score", "/v1/info", "/v1/embed", "/v1/stats", "/v1/validate"]))
    def check(token, scheme, path):
        counted.n += 1
        headers = {} if token is None else {"Authorization": scheme + token}
        r = http.post(service.url + path, data=json.dumps(_valid_body()), headers=headers, timeout=30)
        assert r.status_code == 401
        _assert_client_error(r)

    check()
    _assert_still_serves(http, service)


def test_oversized_bodies_are_413_and_do_not_bill(service, http):
    before = service.stats().get("billed", 0)
    for size in (60_000, 1_000_000, 8_000_000):
        body = {**_valid_body(), "inputs": [{"text": "a" * 150}] * (size // 160)}
        r = _post(http, service, body)
        assert r.status_code == 413, r.text[:200]
        _assert_client_error(r)
    assert service.stats().get("billed", 0) == before
    _assert_still_serves(http, service)


def _raw_request(url: str, head: bytes) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(head)
    return s


def test_slow_and_vanishing_clients_do_not_block_others(service, http):
    body = json.dumps(_valid_body()).encode()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    # Clients that stop halfway through their headers or their body, and stay connected.
    stalled = [_raw_request(service.url, head[: len(head) // 2]) for _ in range(8)]
    stalled += [_raw_request(service.url, head + body[: len(body) // 3]) for _ in range(8)]
    t0 = time.monotonic()
    _assert_still_serves(http, service)
    assert time.monotonic() - t0 < 10
    # A slow client that does finish, one byte at a time, gets its answer.
    slow = _raw_request(service.url, b"")
    for i in range(0, len(head + body), 97):
        slow.sendall((head + body)[i:i + 97])
        time.sleep(0.002)
    answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    # Clients that vanish mid-request (connection reset) leave nothing behind.
    for s in stalled + [slow]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
    _assert_still_serves(http, service)
    stats = service.stats()
    assert stats.get("server_error", 0) == 0
