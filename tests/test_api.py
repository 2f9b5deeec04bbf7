"""Whole runs on tiny models, in-process: outputs, resume, and every method through one loop."""

import json
import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from gdfo_ray import ResumeError
from gdfo_ray.api import run
from gdfo_ray.config import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_its_outputs(tiny_config, method):
    config = tiny_config(method=method)
    result = run(config, progress=None)
    out = result.output_dir
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["test"]) >= {"teacher_manual", "teacher_tuned"}
    assert summary["calls"] <= config.search.budget_calls
    assert os.path.exists(os.path.join(out, "config.yaml")) and os.path.exists(os.path.join(out, "versions.json"))
    if method == "manual":
        assert summary["calls"] == 0 and result.best_z is None
        return
    table = pq.read_table(os.path.join(out, "history.parquet"))
    assert json.loads(table.schema.metadata[b"gdfo_config"])["method"] == method
    history = table.to_pylist()
    assert len(history) == summary["generations"] > 0
    assert {"calls", "fitness_best", "teacher_s", "step_s"} <= set(history[0])
    assert os.path.exists(os.path.join(out, "best_prompt.json"))
    if method in ("kd", "gdfo"):
        assert "student" in summary["test"] and os.path.exists(os.path.join(out, "student.pt"))
        assert summary["median_fidelity"] is not None


def test_every_random_stream_of_a_run_is_derived_in_one_place_and_recorded(tiny_config):
    import dataclasses

    config = tiny_config(method="bbt", **{"task.split_seed": 42, "seed": 5})
    result = run(config, progress=None)
    recorded = json.load(open(os.path.join(result.output_dir, "versions.json")))["seeds"]
    assert recorded == dataclasses.asdict(config.seeds)
    assert recorded["cma"] == 6 and recorded["split"] == 42 and recorded["prompt_space"] == 5


def test_existing_run_is_not_overwritten_silently(tiny_config):
    config = tiny_config(method="bbt")
    run(config, progress=None)
    with pytest.raises(ResumeError, match="--resume"):
        run(config, progress=None)
    with pytest.raises(ResumeError, match=r"differs .*search.popsize"):
        run(config.with_overrides({"search.popsize": 6}), resume=True, progress=None)


def test_resume_may_change_only_what_cannot_change_the_search(tiny_config, tmp_path):
    config = tiny_config(method="bbt")
    first = run(config, progress=None)
    rows = len(np.load(os.path.join(first.output_dir, "test_predictions.npz"))["label"])
    assert rows > 2
    capped = run(config.with_overrides({"task.max_test_examples": 2}), resume=True, progress=None)
    assert len(np.load(os.path.join(first.output_dir, "test_predictions.npz"))["label"]) == 2
    assert [capped.summary[k] for k in ("calls", "generations")] == [first.summary[k] for k in ("calls", "generations")]
    np.testing.assert_allclose(capped.best_z, first.best_z)
    # bbt builds no student: its settings do not matter to the run, so they cannot block its resume.
    run(config.with_overrides({"student.k_steps": 7}), resume=True, progress=None)
    kd = tiny_config(method="kd", output_dir=str(tmp_path / "kd"))
    run(kd, progress=None)
    with pytest.raises(ResumeError, match=r"saved run in \['student.k_steps'\]"):
        run(kd.with_overrides({"student.k_steps": 7}), resume=True, progress=None)


def test_a_run_saved_before_a_setting_existed_resumes_with_the_old_behaviour(tiny_config, tmp_path):
    import pickle

    from gdfo_ray.api import CHECKPOINT

    kd = tiny_config(method="kd", **{"student.text_cache": False})
    run(kd, progress=None)
    path = os.path.join(kd.output_dir, CHECKPOINT)
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    del checkpoint["config"]["student"]["text_cache"]  # as an older version saved it
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f)
    # Before student.text_cache existed the student read the text with the prompt: text_cache=false.
    with pytest.raises(ResumeError, match=r"saved run in \['student.text_cache'\]"):
        run(kd.with_overrides({"student.text_cache": True}), resume=True, progress=None)
    run(kd, resume=True, progress=None)


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap_distill"])
def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tiny_config, tmp_path, crash_after, overlap):
    # With overlap, the checkpoint holds the student before its last, still running, distillation and replays it.
    full = run(tiny_config(output_dir=str(tmp_path / "full"), **{"student.overlap_distill": overlap}), progress=None)
    crash_after(2)
    config = tiny_config(output_dir=str(tmp_path / "cut"), **{"student.overlap_distill": overlap})
    with pytest.raises(crash_after.error):
        run(config, progress=None)
    with open(tmp_path / "cut" / "checkpoint.pkl", "rb") as f:
        assert pickle.load(f)["state"].generation == 2
    crash_after(None)
    resumed = run(config, resume=True, progress=None)
    assert [r["calls"] for r in resumed.history] == [r["calls"] for r in full.history]
    np.testing.assert_allclose([r["fitness_best"] for r in resumed.history],
                               [r["fitness_best"] for r in full.history], rtol=1e-5)
    np.testing.assert_allclose(resumed.best_z, full.best_z, rtol=1e-5)
    assert resumed.summary["test"] == pytest.approx(full.summary["test"])
    np.testing.assert_allclose([r.get("rho", np.nan) for r in resumed.history],
                               [r.get("rho", np.nan) for r in full.history], rtol=1e-5)


def test_overlapped_distillation_spends_the_same_budget_with_a_gradient_one_generation_behind(tiny_config, tmp_path):
    plain = run(tiny_config(output_dir=str(tmp_path / "plain")), progress=None)
    overlap = run(tiny_config(output_dir=str(tmp_path / "overlap"), **{"student.overlap_distill": True}),
                  progress=None)
    assert [r["calls"] for r in overlap.history] == [r["calls"] for r in plain.history]
    # Generation 1 is identical (no steps taken yet either way); from then on the gradients differ.
    assert overlap.history[0]["fitness_best"] == plain.history[0]["fitness_best"]
    assert np.isnan(overlap.history[0]["kd_loss"]) and np.isfinite(overlap.history[1]["kd_loss"])
    assert [r["rho"] for r in overlap.history] != [r["rho"] for r in plain.history]


def test_masked_lm_teacher_and_custom_files(tiny_config, tiny_models, tiny_data_dir):
    base = os.path.join(tiny_data_dir, "sst2")
    config = tiny_config(method="bbt").with_overrides({
        "model.teacher": tiny_models["masked"], "task.name": "movie", "task.labels": ["neg", "pos"],
        "task.verbalizer": ["bad", "great"], "task.template": "{prompt} {text} . it was {mask} .",
        "task.data_dir": None, "task.train_file": os.path.join(base, "16-shot/42/train.jsonl"),
        "task.dev_file": os.path.join(base, "16-shot/42/dev.jsonl"), "task.test_file": os.path.join(base, "test.jsonl")})
    result = run(config, progress=None)
    assert result.summary["task"] == "movie" and result.summary["calls"] == 24


def test_an_lm_student_reads_the_verbalizer(tiny_config, tiny_models):
    config = tiny_config(**{"model.student": tiny_models["masked"], "search.budget_calls": 8})
    result = run(config, progress=None)
    assert 0.0 <= result.summary["test"]["student"] <= 1.0
