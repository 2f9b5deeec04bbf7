"""The limiter that one black box's callers share (gdfo_ray/distributed/limits.py)."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def test_one_limiter_caps_the_whole_pool_in_flight_and_per_second(local_ray, tiny_config, monkeypatch):
    import time

    from gdfo_ray.distributed import make_ray_teacher_pool
    from gdfo_ray.serve import ServeConfig, start_in_thread
    from gdfo_ray.tasks import load_task

    monkeypatch.setenv("GDFO_TEACHER_TOKEN", "limiter-test-token")
    with start_in_thread(ServeConfig(simulate_latency_s=0.2, port=0, token="limiter-test-token")) as service:
        base = {"model.teacher": service.url, "pool.backend": "ray", "pool.n_teacher_actors": 3,
                "pool.calls_per_actor": 2, "pool.teacher_num_cpus": 0.0}
        data = load_task(tiny_config().task, 42)
        prompts = np.zeros((8, 2, 64), np.float32)
        pool = make_ray_teacher_pool(tiny_config(**base, **{"pool.max_in_flight": 2}), data)
        pool.query(prompts[:1], "train", np.arange(4))  # actors up and connected
        t0 = time.perf_counter()
        pool.query(prompts, "train", np.arange(4))
        assert time.perf_counter() - t0 >= 4 * 0.2  # 8 calls, 2 at a time, 0.2 s each
        limits = ray.get(pool.limiter.stats.remote())
        assert limits["peak_in_flight"] == 2 and limits["acquired"] >= 9

        paced = make_ray_teacher_pool(tiny_config(**base, **{"pool.calls_per_s": 10.0}), data)
        paced.query(prompts[:1], "train", np.arange(4))
        t0 = time.perf_counter()
        paced.query(prompts, "train", np.arange(4))
        assert time.perf_counter() - t0 >= 0.7  # 8 calls at 10/s: the 8th starts 0.7 s after the 1st
