"""The cluster configs pass Ray's own validation and place the package and resources where runs expect them."""

from __future__ import annotations

import os
import shlex

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str) -> dict:
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_cluster_launcher_configs_pass_ray_validation_and_install_the_package(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name)
    prepared = prepare_config(raw)
    validate_config(prepared)
    assert prepared["file_mounts"] == {"~/gdfo-ray": "."}  # ray submit copies only run.py
    assert any("pip install -q -e ~/gdfo-ray" in c for c in prepared["setup_commands"])


def test_the_cloud_cluster_marks_teacher_nodes_and_gpu_nodes():
    types = _load("config.yaml")["available_node_types"]
    assert types["teacher_worker"]["resources"]["teacher"] >= 1
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["head"]["resources"] == {"CPU": 0}
    assert all(isinstance(v, int) for t in types.values() for v in t["resources"].values())


def test_the_on_prem_cluster_declares_the_teacher_resource():
    raw = _load("local.yaml")
    assert "available_node_types" not in raw  # the local provider rejects it
    assert any("--resources='{\"teacher\": 4}'" in c for c in raw["worker_start_ray_commands"])


def test_the_kuberay_rayjob_passes_ray_validation_and_its_entrypoint_is_a_valid_run():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    derived = _derive_autoscaling_config_from_ray_cr({"metadata": job["metadata"],
                                                      "spec": job["spec"]["rayClusterSpec"]})  # validates
    resources = {name: t["resources"] for name, t in derived["available_node_types"].items()}
    assert resources["cpu-teachers"]["teacher"] == 8 and resources["gpu-students"]["GPU"] == 1

    import argparse

    from gdfo_ray.cli import _Run, build_config

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "gdfo_ray.cli", "run"]
    parser = argparse.ArgumentParser()
    _Run().add_arguments(parser)
    config = build_config(parser.parse_args(argv[4:]))
    assert config.pool.teacher_resources == {"teacher": 1} and config.search.budget_calls == 8000
