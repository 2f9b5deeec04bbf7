"""The Ray pools as a whole (gdfo_ray/distributed/__init__.py): a run on actors is the in-process run, a killed driver resumes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from killing import kill_at_generation

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def test_a_killed_driver_resumed_ends_as_an_uninterrupted_run(tiny_config, tmp_path):
    """SIGKILL to `gdfo run` mid-run, then `--resume`: the same results as a run never interrupted."""
    base = tiny_config(**{"search.budget_calls": 160, "search.eval_every_calls": 16})

    def command(out, resume=False):
        path = tmp_path / f"{os.path.basename(out)}.yaml"
        path.write_text(yaml.safe_dump({**base.to_dict(), "output_dir": str(out)}))
        return [sys.executable, "-m", "gdfo_ray.cli", "run", "--config", str(path)] + (["--resume"] if resume else [])

    subprocess.run(command(tmp_path / "clean"), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    kill_at_generation(command(killed), 5)
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(command(killed, resume=True), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    import json

    clean_summary = json.loads((tmp_path / "clean" / "summary.json").read_text())
    resumed_summary = json.loads((killed / "summary.json").read_text())
    for key in ("test", "dev_best", "calls", "dev_calls", "generations"):
        assert resumed_summary[key] == clean_summary[key], key
    import pyarrow.parquet as pq

    clean_history = pq.read_table(tmp_path / "clean" / "history.parquet").to_pydict()
    resumed_history = pq.read_table(killed / "history.parquet").to_pydict()
    assert resumed_history["fitness_best"] == clean_history["fitness_best"]


def _drive(config, data, kill_at=None):
    """A whole GDFO run on Ray pools; at generation ``kill_at`` a teacher actor and the student worker die."""
    from gdfo_ray.distributed import make_ray_student_group, make_ray_teacher_pool, release_ray_pools
    from gdfo_ray.api import build_space
    from gdfo_ray.driver import Driver

    teacher, student = make_ray_teacher_pool(config, data), make_ray_student_group(config, data)
    _, space = build_space(config, teacher, student)

    def hook(driver, row):
        if row["generation"] == kill_at:
            ray.kill(teacher.teachers[0], no_restart=False)
            ray.kill(student.workers[0], no_restart=False)

    try:
        driver = Driver(config, data, teacher, student, space, hooks=(hook,))
        driver.run()
        return driver.state, student.recoveries, student.state()
    finally:
        release_ray_pools(teacher, student)


@pytest.mark.parametrize("student", [None, "oracle", "oracle:1", "gp"])
def test_a_run_whose_actors_die_ends_as_an_uninterrupted_run(local_ray, tiny_config, student):
    # A restarted oracle gets the teacher's prompt space back (oracle:S its noise's amplitude too), a restarted GP
    # the answers it had.
    from gdfo_ray.tasks import load_task

    config = tiny_config(**{"pool.backend": "ray", "pool.n_teacher_actors": 2, "pool.teacher_num_cpus": 0.5,
                            "pool.student_num_cpus": 0.5, "pool.student_num_gpus": 0.0,
                            **({"model.student": student} if student else {})})
    data = load_task(config.task, config.seed)
    clean, _, clean_student = _drive(config, data)
    faulty, recoveries, faulty_student = _drive(config, data, kill_at=2)
    assert recoveries >= 1  # the restarted worker was given the last weights before going on
    assert [r["calls"] for r in faulty.history] == [r["calls"] for r in clean.history]
    for key in ("fitness_best", "kd_loss", "dev_score", "rho"):
        np.testing.assert_allclose([r.get(key, np.nan) for r in faulty.history],
                                   [r.get(key, np.nan) for r in clean.history], rtol=1e-6)
    for name, weight in clean_student.get("model", clean_student).items():
        np.testing.assert_allclose(np.asarray(faulty_student.get("model", faulty_student)[name]), np.asarray(weight),
                                   rtol=1e-6)


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
