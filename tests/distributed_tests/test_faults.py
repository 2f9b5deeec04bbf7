"""Faults: teacher actors and student workers die mid-run, the driver is killed; results do not change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

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


@pytest.mark.parametrize("student", [None, "oracle", "gp"])
def test_a_run_whose_actors_die_ends_as_an_uninterrupted_run(local_ray, tiny_config, student):
    # A restarted oracle gets the teacher's prompt space back, a restarted GP the answers it had.
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


def test_a_killed_driver_resumed_ends_as_an_uninterrupted_run(tiny_config, tmp_path):
    """SIGKILL to `gdfo run` mid-run, then `--resume`: the same results as a run never interrupted."""
    base = tiny_config(**{"search.budget_calls": 160, "search.eval_every_calls": 16})

    def command(out, resume=False):
        path = tmp_path / f"{os.path.basename(out)}.yaml"
        path.write_text(yaml.safe_dump({**base.to_dict(), "output_dir": str(out)}))
        return [sys.executable, "-m", "gdfo_ray.cli", "run", "--config", str(path)] + (["--resume"] if resume else [])

    subprocess.run(command(tmp_path / "clean"), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("gen   5 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
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
