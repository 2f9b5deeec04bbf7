"""Recorded answers played back: a replay repeats the recorded search exactly, and refuses to guess."""

import pathlib

import numpy as np
import pytest

from gdfo_ray import ConfigError, GDFOConfig
from gdfo_ray.api import run
from gdfo_ray.exceptions import TeacherError

BENCHMARKS = str(pathlib.Path(__file__).parents[1] / "benchmarks")


def _tiny_settings(tiny_models, data_dir, k_steps: int) -> list:
    """``--set`` values that run the benchmark scripts on the tiny models in seconds."""
    return [f"model.teacher={tiny_models['causal']}", f"model.student={tiny_models['encoder']}",
            "model.dtype=float32", f"task.data_dir={data_dir}", "prompt.intrinsic_dim=8", "prompt.n_prompt_tokens=2",
            "search.popsize=4", f"student.k_steps={k_steps}", "student.batch_rows=8", "pool.backend=local",
            "pool.torch_threads=1"]


@pytest.fixture
def recorded(tiny_config, tmp_path):
    """A bbt run against the teacher that records its answers."""
    path = str(tmp_path / "answers.npz")
    config = tiny_config(**{"method": "bbt", "model.record_answers": path, "output_dir": str(tmp_path / "bbt")})
    return path, run(config, progress=None)


def test_gdfo_with_the_gate_off_replays_bbts_search_on_the_recording_and_measures_its_student(
        tiny_config, tmp_path, recorded):
    path, bbt = recorded
    replay = run(tiny_config(**{"model.teacher": path, "harmonize.gate": "off",
                                "output_dir": str(tmp_path / "replay")}), progress=None)
    assert [r["fitness_best"] for r in replay.history] == [r["fitness_best"] for r in bbt.history]
    assert [r["calls"] for r in replay.history] == [r["calls"] for r in bbt.history]
    assert np.array_equal(replay.best_z, bbt.best_z)
    assert replay.summary["test"]["teacher_tuned"] == bbt.summary["test"]["teacher_tuned"]
    # The student rode along: scored against the recorded answers every generation, its gradient measured.
    assert all(np.isfinite(r["fidelity"]) and r["rho"] is not None for r in replay.history)
    assert all(r.get("z_gd_rank") is None for r in replay.history)  # no candidate joined a population


def test_a_run_that_leaves_the_recorded_trajectory_is_refused(tiny_config, tmp_path, recorded):
    path, _ = recorded
    steering = tiny_config(**{"model.teacher": path, "harmonize.gate": "none", "output_dir": str(tmp_path / "g")})
    with pytest.raises(TeacherError, match="left the recorded trajectory"):
        run(steering, progress=None)


def test_a_crashed_run_keeps_what_it_recorded_and_its_resume_adds_the_rest(tiny_config, tmp_path, crash_after):
    path = str(tmp_path / "answers.npz")
    config = tiny_config(**{"method": "bbt", "model.record_answers": path})
    crash_after(2)
    with pytest.raises(crash_after.error):
        run(config, progress=None)
    with np.load(path) as f:
        before = {k for k in f.files if k.startswith("train_") and k.endswith("_ids")}
    assert len(before) == 2 * config.popsize  # two generations of candidates
    crash_after(None)
    whole = run(config, resume=True, progress=None)
    replay = run(tiny_config(**{"method": "bbt", "model.teacher": path, "output_dir": str(tmp_path / "r")}),
                 progress=None)
    assert [r["fitness_best"] for r in replay.history] == [r["fitness_best"] for r in whole.history]


def test_a_recording_is_refused_where_the_teachers_weights_are_needed(tiny_config, tmp_path, recorded):
    path, _ = recorded
    with pytest.raises(ConfigError, match="white_box.*recording of answers"):
        tiny_config(**{"method": "white_box", "model.teacher": path})
    with pytest.raises(ConfigError, match="teacher's weights.*recording"):
        tiny_config(**{"model.teacher": path, "model.student": "sibling:1"})
    with pytest.raises(ConfigError, match="model.record_answers must name a .npz file"):
        GDFOConfig.from_dict({"model": {"record_answers": "answers.json"}})
    with pytest.raises(TeacherError, match="no such file"):
        run(tiny_config(**{"model.teacher": str(tmp_path / "missing.npz")}), progress=None)


def test_the_fidelity_benchmark_records_once_and_replays_each_student(tiny_models, tiny_data_dir, tmp_path,
                                                                      capsys, monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import fidelity

    settings = _tiny_settings(tiny_models, tiny_data_dir, k_steps=1)
    argv = ["--tasks", "sst2", "--seeds", "42", "--calls", "16", "--cache", str(tmp_path), "--skip-first", "0",
            "--variant", "default", "--variant", "gp=model.student=gp", "--set", ",".join(settings)]
    assert fidelity.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sst2 |")]
    assert [row.split(" | ")[2] for row in rows] == ["default", "gp"]
    assert all("–" not in row for row in rows)  # every replay measured its student
    # A second invocation replays the recording: the teacher is never built again.
    import gdfo_ray.teachers.local as local_teacher

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was asked again")

    monkeypatch.setattr(local_teacher.LocalTeacher, "__init__", refuse)
    assert fidelity.main(argv[:-4] + ["--set", ",".join(settings)]) == 0


def test_the_student_step_benchmark_times_k_steps_on_the_recorded_answers(tiny_models, tiny_data_dir, tmp_path,
                                                                          capsys, monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import student_step

    settings = _tiny_settings(tiny_models, tiny_data_dir, k_steps=3)
    argv = ["--task", "sst2", "--calls", "8", "--cache", str(tmp_path), "--repeats", "1"]
    assert student_step.main(argv + [arg for s in settings for arg in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "3 steps x 8 rows" in out and "float32  training:" in out and "matrix products:" in out
