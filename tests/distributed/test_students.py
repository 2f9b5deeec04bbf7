"""Student workers (gdfo_ray/distributed/students.py): GPUs, data parallelism, and recovery when they die."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


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
