"""Teacher-query actors (gdfo_ray/distributed/teachers.py): a killed one is restarted, given its data again, and its calls re-sent and billed once."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

TOKEN = "fault-test-token"


@pytest.fixture
def simulated_service(monkeypatch):
    from gdfo_ray.serve import ServeConfig, start_in_thread

    monkeypatch.setenv("GDFO_TEACHER_TOKEN", TOKEN)
    with start_in_thread(ServeConfig(simulate_latency_s=0.5, port=0, token=TOKEN)) as handle:
        yield handle


def test_a_teacher_actor_killed_mid_call_is_restarted_and_its_calls_requeried_and_billed_once(
        local_ray, tiny_config, simulated_service):
    from gdfo_ray.distributed import make_ray_teacher_pool
    from gdfo_ray.tasks import load_task

    config = tiny_config(**{"model.teacher": simulated_service.url, "pool.backend": "ray",
                            "pool.n_teacher_actors": 2, "pool.teacher_num_cpus": 0.0})
    data = load_task(config.task, config.seed)
    pool = make_ray_teacher_pool(config, data)
    prompts = np.random.default_rng(0).normal(size=(6, 2, 64)).astype(np.float32)
    keys = [f"k{i}" for i in range(6)]
    expected = pool.query(prompts, "train", np.arange(len(data.train)), [f"ref{i}" for i in range(6)])
    billed = simulated_service.stats()["billed"]

    pid = ray.get(pool.teachers[0].__ray_call__.remote(lambda host: os.getpid()))
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        logits=pool.query(prompts, "train", np.arange(len(data.train)), keys)))
    worker.start()
    time.sleep(0.25)  # both actors are waiting on the service
    ray.kill(pool.teachers[0], no_restart=False)
    worker.join(timeout=120)

    np.testing.assert_array_equal(result["logits"], expected)
    assert pool.requeried >= 1
    assert simulated_service.stats()["billed"] - billed == 6  # the re-queried calls were replays, not new bills
    # Restarted: a new process behind the same handle, which the pool gives the data again (Ray rebuilt it from
    # its constructor's arguments alone) and which then answers as the old one did.
    assert ray.get(pool.teachers[0].__ray_call__.remote(lambda host: os.getpid())) != pid
    ray.get(pool.teachers[0].load.remote(pool.data_ref))
    again = ray.get(pool.teachers[0].query.remote(prompts[:1], "train", np.arange(len(data.train)), ["after"]))
    np.testing.assert_array_equal(again, expected[:1])


def test_actors_restart_from_small_arguments_and_are_given_their_data_again(local_ray, tiny_config, capfd):
    from gdfo_ray.distributed import make_ray_student_group, make_ray_teacher_pool, release_ray_pools
    from gdfo_ray.tasks import load_task

    config = tiny_config(**{"pool.backend": "ray", "pool.n_teacher_actors": 2, "pool.teacher_num_cpus": 0.25,
                            "pool.student_num_cpus": 0.25, "pool.student_num_gpus": 0.0})
    data = load_task(config.task, config.seed)
    teacher, student = make_ray_teacher_pool(config, data), make_ray_student_group(config, data)
    try:
        time.sleep(1.0)  # Ray's core worker reports at actor creation
        # Ray warns, at error level, of an actor that can restart but whose constructor arguments live in the
        # object store (they may be gone when it restarts): these actors take the task data after they start.
        assert "constructor arguments in the object store" not in capfd.readouterr().err
        prompts = np.random.default_rng(0).normal(size=(6, 2, 32)).astype(np.float32)
        rows = np.arange(len(data.train))
        expected = teacher.query(prompts, "train", rows)
        ray.kill(teacher.teachers[0], no_restart=False)
        time.sleep(2.0)
        before = teacher.requeried
        np.testing.assert_allclose(teacher.query(prompts, "train", rows), expected, rtol=1e-6)
        assert teacher.requeried > before  # the restarted actor was given its data, and its pieces sent again
        grad = student.grad_z(np.zeros(8, np.float32))[1]
        ray.kill(student.workers[0], no_restart=False)
        time.sleep(2.0)
        np.testing.assert_allclose(student.grad_z(np.zeros(8, np.float32))[1], grad, rtol=1e-6)
        assert student.recoveries >= 1
    finally:
        release_ray_pools(teacher, student)
