"""gdfo serve: auth, validation, batching, idempotency, rate limits; and the run against it."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from gdfo_ray.exceptions import ConfigError
from gdfo_ray.serve import ServeConfig, start_in_thread
from gdfo_ray.wire import encode_array

TOKEN = "test-token-123"  # tests/conftest.py's SERVICE_TOKEN
TEMPLATE = "{prompt} {text} It was {mask}"


@pytest.fixture(scope="module")
def service(tiny_service):
    return tiny_service


def _post(service, path, body, token=TOKEN, **headers):
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(service.url + path, data=data, headers=headers, timeout=30)


def _body(hidden=32, n=2, texts=("the movie was good", "it was awful"), seed=0, **extra):
    prompt = np.random.default_rng(seed).normal(size=(n, hidden)).astype(np.float32)
    return {"template": TEMPLATE, "verbalizer": ["bad", "great"], "prompt": encode_array(prompt),
            "inputs": [{"text": t} for t in texts], **extra}


def test_routes_need_the_bearer_token_except_health(service):
    assert requests.get(service.url + "/v1/health", timeout=10).json() == {"status": "ok"}
    for token in (None, "wrong-token"):
        r = _post(service, "/v1/score", _body(), token=token)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
    info = requests.get(service.url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert info["kind"] == "causal_lm" and info["hidden_size"] == 32 and info["limits"]["max_inputs"] == 16


def test_score_matches_the_in_process_teacher(service, tiny_config):
    from gdfo_ray.teachers.local import LocalTeacher
    from gdfo_ray.tasks import load_task

    config = tiny_config()
    data = load_task(config.task, config.seed)
    prompt = np.random.default_rng(1).normal(size=(2, 32)).astype(np.float32)
    local = LocalTeacher(config, data).query(prompt[None], "dev", np.arange(len(data.dev)))[0]
    body = {"template": data.spec.template_for("causal_lm"), "verbalizer": list(data.spec.verbalizer),
            "prompt": encode_array(prompt), "inputs": [{"text": t} for t in data.dev.text],
            "max_text_tokens": config.task.max_text_tokens}
    r = _post(service, "/v1/score", body)
    assert r.status_code == 200, r.text
    from gdfo_ray.wire import decode_array

    np.testing.assert_allclose(decode_array(r.json()["logits"], "logits"), local, rtol=1e-4, atol=1e-5)


def _bad_prompt_bytes():
    body = _body()
    body["prompt"]["data"] = base64.b64encode(b"\x00" * 12).decode()
    return body


def _nan_prompt():
    body = _body()
    body["prompt"] = encode_array(np.full((2, 32), np.nan, np.float32))
    return body


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({**_body(), "temperature": 1}, 400, "Unknown fields ['temperature']"),
    ({k: v for k, v in _body().items() if k != "inputs"}, 400, "Missing fields ['inputs']"),
    (_body(hidden=16), 400, "shape (n, 32)"),
    (_body(n=9), 400, "limit is 8"),
    (_bad_prompt_bytes(), 400, "needs 256"),
    (_nan_prompt(), 400, "NaN"),
    ({**_body(), "prompt": {**_body()["prompt"], "dtype": "float64"}}, 400, "prompt.dtype"),
    ({**_body(), "prompt": {**_body()["prompt"], "data": "%%%"}}, 400, "base64"),
    (_body(texts=["x"] * 17), 400, "1 to 16 objects"),
    (_body(texts=["a" * 201]), 400, "at most 200 characters"),
    ({**_body(), "inputs": [{"text": "a", "label": 1}]}, 400, "exactly the fields"),
    ({**_body(), "verbalizer": ["bad"]}, 400, "verbalizer must be"),
    ({**_body(), "verbalizer": ["bad", "zzzunknownword"]}, 400, "not a single token"),
    ({**_body(), "template": "{text} It was {mask}"}, 400, "{prompt} exactly once"),
    ({**_body(), "template": "{prompt} {mask} {text} ."}, 400, "must end the template"),
    ({**_body(), "max_text_tokens": 10_000}, 400, "max_text_tokens"),
    (b'{"template": "' + b"a" * 60_000 + b'"}', 413, "the limit is"),
])
def test_bad_requests_get_a_4xx_with_a_message_and_the_service_stays_up(service, body, status, message):
    r = _post(service, "/v1/score", body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert requests.get(service.url + "/v1/health", timeout=10).status_code == 200


def test_other_routes_validate_too(service):
    assert _post(service, "/v1/embed", {"token_ids": [10**9]}).status_code == 400
    assert _post(service, "/v1/embed", {"token_ids": "1,2"}).status_code == 400
    r = requests.get(service.url + "/v1/score", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    assert requests.get(service.url + "/v1/nowhere", headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=10).status_code == 404


def test_concurrent_calls_share_forwards_and_answer_as_alone(service):
    bodies = [_body(seed=i) for i in range(12)]
    alone = [_post(service, "/v1/score", b).json()["logits"] for b in bodies[:3]]
    before = service.stats()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: _post(service, "/v1/score", b), bodies))
    after = service.stats()
    assert all(a.status_code == 200 for a in answers)
    from gdfo_ray.wire import decode_array

    for a, b in zip(alone, answers):
        np.testing.assert_allclose(decode_array(b.json()["logits"], "l"), decode_array(a, "l"), rtol=1e-4, atol=1e-5)
    assert after["batched_requests"] - before["batched_requests"] == 12
    assert after["batches"] - before["batches"] < 12  # some calls shared a forward


def test_a_retried_call_with_the_same_idempotency_key_is_billed_once(service):
    before = service.stats()
    first = _post(service, "/v1/score", _body(seed=5), **{"Idempotency-Key": "call-abc"})
    again = _post(service, "/v1/score", _body(seed=5), **{"Idempotency-Key": "call-abc"})
    after = service.stats()
    assert first.json()["logits"] == again.json()["logits"]
    assert after["billed"] - before.get("billed", 0) == 1
    assert after["replayed"] - before.get("replayed", 0) == 1


def test_the_service_rate_limit_answers_429_with_retry_after():
    with start_in_thread(ServeConfig(simulate_latency_s=0.0, port=0, token=TOKEN, rate_limit=1.0)) as s:
        codes = [_post(s, "/v1/score", _body(hidden=64)) for _ in range(3)]
    assert codes[0].status_code == 200
    assert [c.status_code for c in codes[1:]] == [429, 429]
    assert codes[1].headers["Retry-After"] == "1"


def test_serve_config_is_validated():
    with pytest.raises(ConfigError, match="Either pass a model"):
        ServeConfig()
    with pytest.raises(ConfigError, match="max_inputs must be an integer >= 1"):
        ServeConfig(model="m", max_inputs=0)
    with pytest.raises(ConfigError, match="at least 8 characters"):
        ServeConfig(model="m", token="short")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig,inherited", [(signal.SIGINT, None), (signal.SIGTERM, None),
                                           (signal.SIGINT, "ignored")],
                         ids=["SIGINT", "SIGTERM", "SIGINT-ignored-by-the-parent"])
def test_gdfo_serve_command_starts_answers_and_stops_on_a_signal(tiny_models, sig, inherited):
    # "ignored": what a shell gives a command it starts in the background without job control
    # (`gdfo serve ... &` in a script): the service must stop on SIGINT all the same.
    import threading

    env = {**os.environ, "GDFO_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "gdfo_ray.cli", "serve", "--model", tiny_models["causal"],
                             "--port", "0", "--threads", "1", "--shutdown-grace", "5"],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    lines: list[str] = []
    url_seen = threading.Event()

    def drain() -> None:  # read all of stderr, so that the service can never block on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "http://" in line:
                url_seen.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert url_seen.wait(timeout=120), "".join(lines)
        url = next(line for line in lines if "http://" in line).split(" on ")[-1].strip()
        assert requests.get(url + "/v1/health", timeout=10).status_code == 200
        info = requests.get(url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert info.json()["hidden_size"] == 32
    finally:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            reader.join(timeout=10)
            pytest.fail(f"gdfo serve did not stop within 90 s of {sig.name}; its stderr:\n" + "".join(lines))
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
    assert f"[gdfo serve] stopped ({sig.name})" in "".join(lines)


def test_a_run_against_the_service_bills_exactly_its_calls(service, tiny_config, tmp_path, monkeypatch):
    from gdfo_ray.api import run

    monkeypatch.setenv("GDFO_TEACHER_TOKEN", TOKEN)
    local = run(tiny_config(output_dir=str(tmp_path / "local")), progress=None)
    before = service.stats()
    remote = run(tiny_config(output_dir=str(tmp_path / "remote"), **{"model.teacher": service.url}), progress=None)
    after = service.stats()
    np.testing.assert_allclose([r["fitness_best"] for r in remote.history],
                               [r["fitness_best"] for r in local.history], rtol=1e-4)
    s = remote.summary
    # Train calls + dev calls + the two test scores (manual and tuned prompt), each billed once.
    assert after["billed"] - before.get("billed", 0) == s["calls"] + s["dev_calls"] + 2
    assert s["calls"] == 24


def test_a_service_teacher_without_a_token_is_refused_clearly(service, tiny_config, tmp_path, monkeypatch):
    from gdfo_ray.api import run
    from gdfo_ray.exceptions import TeacherError

    monkeypatch.delenv("GDFO_TEACHER_TOKEN", raising=False)
    with pytest.raises(TeacherError, match=r"set \$GDFO_TEACHER_TOKEN"):
        run(tiny_config(output_dir=str(tmp_path / "r"), **{"model.teacher": service.url}), progress=None)


def test_the_service_refuses_to_listen_beyond_loopback_without_a_token(monkeypatch):
    from gdfo_ray.serve import TOKEN_ENV, resolve_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost.example.com"):
        with pytest.raises(ConfigError, match="Refusing to listen on .* without a token"):
            start_in_thread(ServeConfig(simulate_latency_s=0.0, host=host, port=0))
    assert resolve_token(ServeConfig(simulate_latency_s=0.0, host="127.0.0.1"))[1] is True  # generated, shown once
    assert resolve_token(ServeConfig(simulate_latency_s=0.0, host="0.0.0.0", token="given-secret")) == (
        "given-secret", False)
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        resolve_token(ServeConfig(simulate_latency_s=0.0, host="0.0.0.0"))
    monkeypatch.setenv(TOKEN_ENV, "env-secret-123")
    assert resolve_token(ServeConfig(simulate_latency_s=0.0, host="0.0.0.0")) == ("env-secret-123", False)


def test_a_replayed_key_is_answered_from_memory_without_a_rate_limit_slot():
    with start_in_thread(ServeConfig(simulate_latency_s=0.0, port=0, token=TOKEN, rate_limit=1.0)) as s:
        first = _post(s, "/v1/score", _body(hidden=64), **{"Idempotency-Key": "k-1"})
        again = _post(s, "/v1/score", _body(hidden=64), **{"Idempotency-Key": "k-1"})
        other = _post(s, "/v1/score", _body(hidden=64), **{"Idempotency-Key": "k-2"})
        stats = s.stats()
    assert (first.status_code, again.status_code, other.status_code) == (200, 200, 429)
    assert again.json() == first.json() and stats["billed"] == 1 and stats["replayed"] == 1
    assert 0 < int(other.headers["Retry-After-Ms"]) <= 1000 and other.headers["Retry-After"] == "1"


def test_a_stopped_service_leaves_no_thread_of_its_own_running(tiny_models):
    """Threads left behind would still run while the interpreter exits (tests, notebooks, benchmarks)."""
    import threading

    before = set(threading.enumerate())
    with start_in_thread(ServeConfig(model=tiny_models["causal"], port=0, token=TOKEN, threads=1,
                                     dtype="float32")) as s:
        assert _post(s, "/v1/score", _body()).status_code == 200
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], f"threads still running after stop(): {left}"


def test_a_stop_waits_for_requests_in_flight_no_longer_than_the_grace():
    """A call the (simulated) model needs 20 s for is in flight when the service stops: with a 0.5 s grace
    the stop takes about that, not the 20 s of the call (nor aiohttp's own 60 s grace)."""
    import threading

    config = ServeConfig(simulate_latency_s=20.0, port=0, token=TOKEN, shutdown_grace_s=0.5)
    s = start_in_thread(config)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(_try_post(s, "/v1/score", _body(hidden=64))), daemon=True)
    caller.start()
    deadline = time.time() + 10
    while s.stats().get("requests", 0) < 1 and time.time() < deadline:  # the call is in flight
        time.sleep(0.05)
    t0 = time.time()
    s.stop()
    assert time.time() - t0 < 10
    caller.join(timeout=30)
    assert answers and answers[0] != 200  # cut, not answered
    with pytest.raises(ConfigError, match="shutdown_grace_s"):
        ServeConfig(model="m", shutdown_grace_s=-1.0)


def _try_post(service, path, body):
    try:
        return _post(service, path, body).status_code
    except requests.RequestException as e:
        return type(e).__name__


def test_validate_checks_a_call_as_score_would_and_bills_nothing(service):
    before = service.stats().get("billed", 0)
    r = _post(service, "/v1/validate", _body())
    assert r.status_code == 200 and r.json() == {"ok": True, "rows": 2}
    r = _post(service, "/v1/validate", {**_body(), "verbalizer": ["very bad", "great"]})
    assert r.status_code == 400 and "verbalizer" in r.json()["error"]["message"]
    r = _post(service, "/v1/validate", _body(texts=["x"] * 17))
    assert r.status_code == 400 and "1 to 16 objects" in r.json()["error"]["message"]
    assert service.stats().get("billed", 0) == before
    info = requests.get(service.url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert info["limits"]["rate_burst"] == 1 and info["limits"]["max_batch_rows"] == 256
