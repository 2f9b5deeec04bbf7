"""The rate limiters (gdfo_ray/ratelimit.py): the pacer every limiter shares, and the in-process limiter."""

from __future__ import annotations

import threading
import time

import pytest

from gdfo_ray.ratelimit import LocalLimiter, Pacer


def test_pacer_bounds_every_window_and_bursts():
    p = Pacer(rate=10.0, burst=3)
    starts = [p.reserve(now=0.0) for _ in range(6)]
    assert starts == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3])
    assert Pacer(None).reserve(now=5.0) == 0.0
    with pytest.raises(ValueError, match="rate must be positive"):
        Pacer(rate=0.0)


def test_local_limiter_caps_calls_in_flight_across_threads():
    limiter = LocalLimiter(calls_per_s=None, max_in_flight=3)
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def call():
        limiter.acquire()
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        limiter.release()

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["peak"] == 3


def test_local_limiter_paces_calls_per_second():
    slept = []
    limiter = LocalLimiter(calls_per_s=4.0, max_in_flight=None, clock=lambda: 0.0, sleep=slept.append)
    for _ in range(3):
        limiter.acquire()
        limiter.release()
    assert slept == pytest.approx([0.25, 0.5])
