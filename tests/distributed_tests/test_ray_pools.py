"""Ray actor paths on a local Ray with 2 CPUs (and a logical GPU for scheduling)."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def test_ray_run_matches_in_process_run(local_ray, tiny_config, tmp_path):
    from gdfo_ray.api import run

    local = run(tiny_config(output_dir=str(tmp_path / "local")), progress=None)
    # Two teacher actors split each population; the student worker takes the logical GPU.
    on_ray = run(tiny_config(output_dir=str(tmp_path / "ray"), **{
        "pool.backend": "ray", "pool.n_teacher_actors": 2, "pool.teacher_num_cpus": 0.5,
        "pool.student_num_cpus": 0.5}), progress=None)
    assert [r["calls"] for r in on_ray.history] == [r["calls"] for r in local.history]
    np.testing.assert_allclose([r["fitness_best"] for r in on_ray.history],
                               [r["fitness_best"] for r in local.history], rtol=1e-4)
    assert ray.is_initialized()  # a Ray it did not start is left running


def test_student_workers_ask_for_a_gpu_when_the_cluster_has_one(local_ray):
    from gdfo_ray.config import PoolConfig
    from gdfo_ray.distributed import student_gpus

    assert student_gpus(PoolConfig()) == 1.0
    assert student_gpus(PoolConfig(student_num_gpus=0.25)) == 0.25


def test_data_parallel_students_average_gradients(local_ray, tiny_config):
    """Two workers on shards take the same step as one worker on the whole batch."""
    from gdfo_ray.distributed import make_ray_student_group
    from gdfo_ray.student import DistillBatch, StudentGroup, StudentTrainer
    from gdfo_ray.tasks import load_task

    config = tiny_config(**{"pool.backend": "ray", "pool.student_num_cpus": 0.5, "pool.n_student_workers": 2,
                            "pool.student_num_gpus": 0.0})
    data = load_task(config.task, config.seed)
    rng = np.random.default_rng(0)
    batch = DistillBatch(rng.normal(size=(8, 8)).astype(np.float32), np.arange(8) % len(data.train),
                         rng.normal(size=(8, 2)).astype(np.float32), data.train.label[np.arange(8) % len(data.train)])
    single = StudentGroup([StudentTrainer(config, data)])
    pair = make_ray_student_group(config, data)
    single.distill([batch])
    pair.distill([batch])
    a = single.state()["model"]
    incarnations = ray.get([w.restore.remote(None) for w in pair.workers])
    for worker_state in ray.get([w.run.remote(i, "state") for w, i in zip(pair.workers, incarnations)]):
        for key in a:
            np.testing.assert_allclose(worker_state["model"][key].numpy(), a[key].numpy(), rtol=1e-4, atol=1e-6)


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


def test_a_pool_larger_than_the_cluster_fails_clearly_instead_of_waiting_forever(local_ray, tiny_config, tmp_path):
    from gdfo_ray.api import run
    from gdfo_ray.distributed import actor_bundles, shortfall
    from gdfo_ray.exceptions import GDFOError

    config = tiny_config(output_dir=str(tmp_path / "big"), **{
        "pool.backend": "ray", "pool.n_teacher_actors": 3, "pool.wait_for_resources_s": 0.5})
    need, have, short = shortfall(actor_bundles(config))  # 3 teachers + a student on the logical GPU
    assert (need, have, short) == ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 4.0})
    with pytest.raises(GDFOError, match=r"need \{'CPU': 4.0, 'GPU': 1.0\}, but the Ray cluster has \{'CPU': 2.0"):
        run(config, progress=None)
