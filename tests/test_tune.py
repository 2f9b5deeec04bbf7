"""gdfo tune: a sweep against a black-box service, the shared budget, the outputs, restore, placement groups."""

import os

import pyarrow.parquet as pq
import pytest
import yaml

from gdfo_ray import ConfigError, GDFOConfig
from gdfo_ray.cli import main
from gdfo_ray.exceptions import GDFOError
from gdfo_ray.serve import ServeConfig, start_in_thread
from gdfo_ray.tune import TuneSettings, default_space, trial_bundles, tune_run

pytestmark = pytest.mark.ray

TOKEN = "tune-test-token"


@pytest.fixture(scope="module")
def service(tiny_models):
    with start_in_thread(ServeConfig(model=tiny_models["causal"], port=0, token=TOKEN, threads=1,
                                     dtype="float32")) as handle:
        yield handle


def _settings(tmp, tiny_models, data_dir, url, **kw):
    base = GDFOConfig.from_dict({
        "method": "bbt", "seed": 42, "task": {"name": "sst2", "data_dir": data_dir},
        "model": {"teacher": url, "student": tiny_models["encoder"], "dtype": "float32"},
        "prompt": {"intrinsic_dim": 4, "n_prompt_tokens": 2}, "search": {"budget_calls": 8},
        "pool": {"backend": "local", "torch_threads": 1, "calls_per_s": 200.0, "max_in_flight": 2},
    }).to_dict()
    space = {"search.sigma0": {"loguniform": [0.3, 3.0]}, "search.popsize": {"randint": [4, 6]}}
    return TuneSettings(base, space=space, num_samples=3, storage_dir=str(tmp), name="sweep", trial_cpus=1,
                        **kw)


def test_sweep_shares_one_budget_never_scores_test_and_writes_a_runnable_best_config(
        local_ray, service, tiny_models, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GDFO_TEACHER_TOKEN", TOKEN)
    billed_before = service.stats().get("billed", 0)
    settings = _settings(tmp_path, tiny_models, tiny_data_dir, service.url, total_calls=18)
    result = tune_run(settings, say=lambda _: None)

    trials = pq.read_table(result.trials_path).to_pylist()
    assert len(trials) == 3 and all(t["error"] is None for t in trials)
    spent = sum(t["calls"] for t in trials)
    assert spent <= 18  # the sweep's budget, across trials
    # Every call the service billed is a train or dev call a trial reported: the test set was never scored.
    assert service.stats()["billed"] - billed_before == spent + sum(t["dev_calls"] for t in trials)
    with open(os.path.join(settings.experiment_dir, "shared_budget.json")) as f:
        assert yaml.safe_load(f)["spent"] == spent

    assert result.best_dev_score == pytest.approx(max(t["dev_score"] for t in trials))
    config = GDFOConfig.from_dict(yaml.safe_load(open(result.best_config_path)))
    assert config.search.sigma0 == pytest.approx(result.best_params["search.sigma0"])
    assert config.search.popsize == result.best_params["search.popsize"]
    assert config.search.eval_every_calls == 20 and config.output_dir is None  # the trial-only settings are gone

    # gdfo run --config accepts it as is.
    out = tmp_path / "rerun"
    assert main(["run", "--config", result.best_config_path, "--output-dir", str(out)]) == 0
    assert (out / "summary.json").exists()

    # Restore: the finished experiment comes back with the same trials; a fresh start there is refused.
    again = tune_run(settings, resume=True, say=lambda _: None)
    assert again.best_params == result.best_params
    with pytest.raises(GDFOError, match="already holds a sweep"):
        tune_run(settings, say=lambda _: None)


def test_a_trial_larger_than_the_cluster_is_refused_before_it_hangs(local_ray, tiny_models, tiny_data_dir, tmp_path):
    settings = _settings(tmp_path, tiny_models, tiny_data_dir, tiny_models["causal"])
    too_big = TuneSettings(settings.base, space=settings.space, storage_dir=str(tmp_path), trial_cpus=64)
    with pytest.raises(ConfigError, match="one trial needs"):
        tune_run(too_big, say=lambda _: None)


def test_placement_group_has_a_bundle_per_actor(tiny_models):
    config = GDFOConfig.from_dict({"method": "gdfo", "pool": {
        "backend": "ray", "n_teacher_actors": 3, "n_student_workers": 2, "teacher_num_cpus": 1,
        "teacher_resources": {"teacher": 1}, "student_num_cpus": 2, "student_num_gpus": 0.5}})
    bundles = trial_bundles(config, trial_cpus=2, trial_gpus=0)
    assert bundles == [{"CPU": 1.0}] + [{"CPU": 1.0, "teacher": 1}] * 3 + [{"CPU": 2.0, "GPU": 0.5}] * 2
    local = GDFOConfig.from_dict({"pool": {"backend": "local"}})
    assert trial_bundles(local, trial_cpus=2, trial_gpus=1) == [{"CPU": 2, "GPU": 1}]


def test_space_is_checked_at_the_boundary(tiny_models, tiny_data_dir, tmp_path):
    base = _settings(tmp_path, tiny_models, tiny_data_dir, tiny_models["causal"]).base
    with pytest.raises(ConfigError, match="'search.sigma' is not a valid config key"):
        TuneSettings(base, space={"search.sigma": {"uniform": [0, 1]}})
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        TuneSettings(base, space={"search.sigma0": {"loguniform": [0, 1]}})
    with pytest.raises(ConfigError, match="distribution one of"):
        TuneSettings(base, space={"search.sigma0": [0.1, 1]})
    with pytest.raises(ConfigError, match="nothing to tune"):
        default_space("manual")
    assert {"harmonize.eta", "student.tau", "search.sigma0"} <= set(default_space("gdfo"))
    assert "student.tau" not in default_space("bbt")
    # popsize is capped so that one generation fits the trial's budget.
    assert TuneSettings(base).space["search.popsize"] == {"randint": [6, 9]}


def test_an_interrupted_sweep_resumes_to_the_end(tiny_models, tiny_data_dir, tmp_path):
    """Ctrl-C mid-sweep, then ``gdfo tune --resume``: every trial ends, none runs twice from scratch."""
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({
        "method": "bbt", "task": {"name": "sst2", "data_dir": tiny_data_dir},
        "model": {"teacher": tiny_models["causal"], "dtype": "float32"},
        "prompt": {"intrinsic_dim": 4, "n_prompt_tokens": 2}, "search": {"budget_calls": 16},
        "pool": {"torch_threads": 1, "ray_num_cpus": 2}}))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search.sigma0": {"loguniform": [0.3, 3.0]}, "search.popsize": {"randint": [4, 6]}}))

    def command(*extra):
        return [sys.executable, "-m", "gdfo_ray.cli", "tune", "--config", str(config), "--space", str(space),
                "--samples", "4", "--storage", str(tmp_path), "--name", "sweep", "--trial-cpus", "1",
                "--max-concurrent", "1", *extra]

    proc = subprocess.Popen(command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    experiment = tmp_path / "sweep"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first trial to finish, then interrupt
        if experiment.exists() and any((d / "result.json").exists() and (d / "result.json").stat().st_size
                                       for d in experiment.glob("trial_*")):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert len(list(experiment.glob("trial_*"))) < 4  # interrupted before the sweep ended
    # The sweep's name is enough: its settings come back from sweep.yaml.
    resume = [sys.executable, "-m", "gdfo_ray.cli", "tune", "--storage", str(tmp_path), "--name", "sweep", "--resume"]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    trials = pq.read_table(experiment / "trials.parquet").to_pylist()
    assert len(trials) == 4 and all(t["status"] in ("FINISHED", "STOPPED") and t["error"] is None for t in trials)
    assert all(t["calls"] > 0 for t in trials)


def test_trial_actors_run_inside_the_trials_placement_group(local_ray, tiny_models, tiny_data_dir, tmp_path):
    """Two trials, each reserving the whole 2-CPU cluster (itself + its teacher actor): an actor placed
    outside its trial's placement group would find no CPU left and the sweep would never end."""
    settings = _settings(tmp_path, tiny_models, tiny_data_dir, tiny_models["causal"])
    base = GDFOConfig.from_dict(settings.base).with_overrides({"pool.backend": "ray", "pool.teacher_num_cpus": 1.0,
                                                               "pool.calls_per_s": None, "pool.max_in_flight": None})
    sweep = TuneSettings(base.to_dict(), space=settings.space, num_samples=2, storage_dir=str(tmp_path),
                         name="pg", trial_cpus=1)
    assert trial_bundles(sweep.config, 1, 0) == [{"CPU": 1.0}, {"CPU": 1.0}]
    result = tune_run(sweep, say=lambda _: None)
    trials = pq.read_table(result.trials_path).to_pylist()
    assert len(trials) == 2 and all(t["error"] is None and t["calls"] > 0 for t in trials)


def test_the_first_trial_is_the_base_configs_own_update_where_the_space_holds_it():
    from gdfo_ray.tune import base_point

    space = {"harmonize.gate": {"choice": ["rho", "none"]}, "harmonize.eta": {"uniform": [0.1, 1.0]},
             "search.popsize": {"randint": [6, 31]}}
    base = {"search": {"popsize": 12}, "harmonize": {"eta": 0.3}}
    assert base_point(space, base) == {"harmonize.gate": "rho", "harmonize.eta": 0.3, "search.popsize": 12}
    assert base_point(space, {"harmonize": {"eta": 1.5}}) is None  # outside the uniform range
    assert base_point(space, {"search": {"popsize": 31}}) is None  # randint's upper end is excluded
    assert base_point({"harmonize.gate": {"choice": ["none"]}}, {}) is None
