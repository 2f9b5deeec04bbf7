"""A simulated 3-node cluster: a head, a GPU node (a logical GPU) and a teacher node (custom resource)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

TOKEN = "cluster-test-token"


@pytest.fixture(scope="module")
def three_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    teacher_node = cluster.add_node(num_cpus=1, resources={"teacher": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"head": cluster.head_node.node_id, "gpu": gpu_node.node_id, "teacher": teacher_node.node_id,
               "address": cluster.address}
    finally:
        ray.shutdown()
        cluster.shutdown()
        # Cluster.shutdown() leaves its state accessor connected: its gRPC and io threads would then
        # outlive the test, still running while the interpreter exits.
        cluster.global_state.disconnect()


def _cluster_config(tiny_config, **overrides):
    return tiny_config(**{"pool.backend": "ray", "pool.teacher_resources": {"teacher": 1},
                          "pool.teacher_num_cpus": 0.0, "pool.student_num_cpus": 0.0, **overrides})


def test_a_plain_ray_init_elsewhere_on_the_machine_does_not_join_the_test_cluster(three_nodes, machine_ray_env):
    """A user's `gdfo run` started while the tests run once joined this cluster, and died with it."""
    env = {k: v for k, v in os.environ.items() if k not in machine_ray_env}
    env.update({k: v for k, v in machine_ray_env.items() if v is not None})
    # The resolution ray.init() does for a missing address: an address joins it, None starts Ray here.
    found = subprocess.run(
        [sys.executable, "-c", "from ray._private.services import canonicalize_bootstrap_address as c; print(c(None))"],
        env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert found != three_nodes["address"]


def test_ray_address_local_starts_ray_apart_from_the_machines_registered_cluster(three_nodes):
    """This session's environment registers the test cluster, so a plain ray.init() here would join it."""
    script = ("import ray; from gdfo_ray.config import PoolConfig; from gdfo_ray.distributed import init_ray; "
              "assert init_ray(PoolConfig(ray_address='local', ray_num_cpus=1)); "
              "print(ray.cluster_resources()['CPU'], ray.get_runtime_context().gcs_address); ray.shutdown()")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cpus, address = out.stdout.split()[-2:]
    assert address != three_nodes["address"] and float(cpus) == 1.0  # started here, with pool.ray_num_cpus


def test_teacher_actors_land_on_teacher_nodes_and_students_share_the_gpu_node(three_nodes, tiny_config):
    from gdfo_ray.distributed import make_ray_student_group, make_ray_teacher_pool, release_ray_pools
    from gdfo_ray.tasks import load_task

    config = _cluster_config(tiny_config, **{"pool.n_teacher_actors": 2, "pool.n_student_workers": 2,
                                             "pool.student_num_gpus": 0.5})
    data = load_task(config.task, config.seed)
    teachers, students = make_ray_teacher_pool(config, data), make_ray_student_group(config, data)
    try:
        assert set(ray.get([a.node_id.remote() for a in teachers.teachers])) == {three_nodes["teacher"]}
        assert set(ray.get([w.node_id.remote() for w in students.workers])) == {three_nodes["gpu"]}
    finally:
        release_ray_pools(teachers, students)


def test_a_gdfo_run_spans_the_cluster_against_a_served_black_box(three_nodes, tiny_config, tiny_models, tmp_path,
                                                                 monkeypatch):
    from gdfo_ray.api import run
    from gdfo_ray.serve import ServeConfig, start_in_thread

    monkeypatch.setenv("GDFO_TEACHER_TOKEN", TOKEN)
    with start_in_thread(ServeConfig(model=tiny_models["causal"], port=0, token=TOKEN, threads=1,
                                     dtype="float32")) as service:
        config = _cluster_config(tiny_config, **{
            "model.teacher": service.url, "output_dir": str(tmp_path / "run"), "pool.n_teacher_actors": 2,
            "pool.calls_per_actor": 2, "pool.calls_per_s": 200.0, "pool.max_in_flight": 3})
        result = run(config, progress=None)
        stats = service.stats()
    s = result.summary
    assert s["calls"] == config.search.budget_calls
    assert stats["billed"] == s["calls"] + s["dev_calls"] + 2  # each call billed once, none lost
    assert np.isfinite(s["test"]["teacher_tuned"]) and "student" in s["test"]
