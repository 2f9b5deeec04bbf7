"""The service client's retry contract, against a scripted HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gdfo_ray.exceptions import TeacherError
from gdfo_ray.teachers.http import HttpTeacher, backoff_delay, parse_retry_after
from gdfo_ray.wire import encode_array

INFO = {"model": "scripted", "kind": "causal_lm", "hidden_size": 4, "embedding_std": 1.0, "vocab_size": 50}


class Scripted:
    """A server answering /v1/score from a script of (status, headers, delay) and then 200s."""

    def __init__(self, script):
        self.script = list(script)
        self.seen = []  # (Idempotency-Key, time) of every /v1/score attempt
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, INFO)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.headers.get("Idempotency-Key"), time.monotonic()))
                status, headers, delay = outer.script.pop(0) if outer.script else (200, (), 0.0)
                time.sleep(delay)
                if status != 200:
                    self._send(status, {"error": {"code": status, "message": f"scripted {status}"}}, headers)
                    return
                n = len(body["inputs"])
                self._send(200, {"logits": encode_array(np.full((n, 2), 0.5, np.float32))})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def client(tiny_config):
    from gdfo_ray.tasks import load_task

    servers = []

    def build(script, **service):
        server = Scripted(script)
        servers.append(server)
        overrides = {"model.teacher": server.url, "service.backoff_s": 0.01, "service.backoff_max_s": 0.05,
                     **{f"service.{k}": v for k, v in service.items()}}
        config = tiny_config(**overrides)
        return HttpTeacher(config, load_task(config.task, config.seed), token="tok-12345678"), server

    yield build
    for s in servers:
        s.close()


def _query(teacher, key="call-1"):
    return teacher.query(np.zeros((1, 2, 4), np.float32), "train", np.arange(3), [key])


def test_429_and_5xx_are_retried_with_the_same_key_and_retry_after_is_honoured(client):
    teacher, server = client([(503, (), 0), (429, (("Retry-After", "1"),), 0), (502, (), 0)])
    logits = _query(teacher)
    assert logits.shape == (1, 3, 2)
    assert [k for k, _ in server.seen] == ["call-1"] * 4
    assert server.seen[2][1] - server.seen[1][1] >= 0.95  # waited for Retry-After, not the 0.05 s backoff
    assert teacher.get_stats() == {"calls": 2, "attempts": 5, "retries": 3, "failed": 0,
                                   "outages": 0}  # /v1/info + the call


def test_a_timeout_is_retried(client):
    teacher, server = client([(200, (), 1.5)], timeout_s=0.5)
    assert _query(teacher).shape == (1, 3, 2)
    assert len(server.seen) == 2


def test_a_call_that_keeps_failing_raises_and_is_not_scored(client):
    teacher, server = client([(500, (), 0)] * 3, max_retries=2, max_outage_s=0)
    with pytest.raises(TeacherError, match=r"failed after 3 attempts \(last: 500: scripted 500\)"):
        _query(teacher)
    assert teacher.get_stats()["failed"] == 1


def test_an_outage_past_the_quick_retries_is_waited_out_and_announced_once(client):
    said = []
    teacher, server = client([(503, (), 0)] * 7, max_retries=2, probe_max_s=0.05)
    teacher.say = said.append
    assert _query(teacher).shape == (1, 3, 2)
    assert [k for k, _ in server.seen] == ["call-1"] * 8  # the same key throughout: billed once
    assert teacher.get_stats()["outages"] >= 1 and teacher.get_stats()["failed"] == 0
    assert "not answering (last: 503: scripted 503)" in said[0] and "max_outage_s=300" in said[0]
    assert "is back after" in said[1] and "the run goes on" in said[1]


def test_an_outage_longer_than_max_outage_s_stops_the_call_with_the_wait_named(client):
    teacher, server = client([(502, (), 0)] * 10_000, max_retries=1, max_outage_s=0.5, probe_max_s=0.05)
    teacher.say = lambda line: None
    started = time.monotonic()
    with pytest.raises(TeacherError, match=r"did not answer for \d+ s, longer than service.max_outage_s=0.5.*--resume"):
        _query(teacher)
    assert 0.4 <= time.monotonic() - started < 10


def test_other_4xx_fail_at_once_with_the_service_message(client):
    teacher, server = client([(400, (), 0)])
    with pytest.raises(TeacherError, match=r"refused the call \(400\): scripted 400"):
        _query(teacher)
    assert len(server.seen) == 1
    teacher, server = client([(401, (), 0)])
    with pytest.raises(TeacherError, match=r"Check \$GDFO_TEACHER_TOKEN"):
        _query(teacher)


def test_a_retry_after_beyond_the_limit_fails_with_advice(client):
    teacher, _ = client([(429, (("Retry-After", "3600"),), 0)], max_retry_after_s=60)
    with pytest.raises(TeacherError, match="asked to retry after 3600 s"):
        _query(teacher)


def test_retry_after_and_backoff_helpers():
    import email.utils
    import random

    assert parse_retry_after(email.utils.formatdate(1000.0 + 30, usegmt=True), now=1000.0) == pytest.approx(30)
    assert parse_retry_after("-5") == 0.0
    rng = random.Random(0)
    delays = [backoff_delay(k, 0.5, 4.0, rng) for k in range(8)]
    assert all(0 <= d <= min(4.0, 0.5 * 2**k) for k, d in enumerate(delays))
    assert len(set(delays)) == len(delays)  # jittered


def test_429s_that_say_when_are_retried_then_beyond_max_retries_with_jitter(client):
    refusals = [(429, (("Retry-After", "1"), ("Retry-After-Ms", "50")), 0)] * 6
    teacher, server = client(refusals, max_retries=2)  # six refusals, two retries allowed for other failures
    assert _query(teacher).shape == (1, 3, 2)
    gaps = np.diff([t for _, t in server.seen])
    assert len(gaps) == 6 and all(0.045 <= g <= 0.2 for g in gaps)  # 50 ms, plus up to 50 ms of jitter
    assert len({round(g, 3) for g in gaps}) > 1


def test_429s_beyond_the_total_wait_fail_with_advice(client):
    teacher, _ = client([(429, (("Retry-After-Ms", "200"),), 0)] * 20, max_retry_after_s=1.0)
    with pytest.raises(TeacherError, match=r"kept answering 429 .* lower pool.calls_per_s"):
        _query(teacher)
