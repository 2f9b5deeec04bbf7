"""The machine a result records: processor, cores, instruction sets, and a matmul rate measured quickly."""

from __future__ import annotations

import json
import os
import time

import pytest

from gdfo_ray.machine import CPU_FEATURES, cores_available, describe_machine, matmul_rate


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_matmul_rate_is_measured_in_a_second_or_so_even_where_the_dtype_is_slow(dtype):
    started = time.perf_counter()
    rate = matmul_rate(dtype, seconds=0.2)
    assert rate > 1e6
    assert time.perf_counter() - started < 5.0


def test_the_machine_names_its_processor_cores_features_and_rate():
    machine = describe_machine("float32")
    assert set(machine["cpu_features"]) == set(CPU_FEATURES)
    assert machine["cores"] == cores_available() <= (os.cpu_count() or 1)
    assert machine["matmul_dtype"] == "float32" and machine["matmul_gflops"] > 0
    json.dumps(machine)  # it travels in versions.json and a campaign's Parquet


def test_a_run_records_its_machine_and_its_teacher_time_against_the_floor(tiny_config, tmp_path):
    from gdfo_ray.api import run

    result = run(tiny_config(method="bbt"), progress=None)
    with open(os.path.join(result.output_dir, "versions.json")) as f:
        assert json.load(f)["machine"]["cores"] >= 1
    s = result.summary
    assert s["machine"]["matmul_dtype"] == "float32"
    assert s["floor_s_per_call"] > 0
    assert s["s_per_call_over_floor"] == pytest.approx(s["s_per_call"] / s["floor_s_per_call"])
