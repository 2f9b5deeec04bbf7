import argparse
import os
import sys

import pytest

from gdfo_ray.cli import _Run, main


def test_bad_input_exits_1_with_a_message(capsys, tmp_path):
    assert main(["run", "--set", "search.popsiz=3"]) == 1
    assert "Similar valid keys: ['popsize']" in capsys.readouterr().err
    assert main(["run", "--task", "nope", "--backend", "local", "--output-dir", str(tmp_path / "o")]) == 1
    assert "is not a preset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
    with pytest.raises(SystemExit):
        main(["run", "--method", "sgd"])


def test_unreadable_config_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    assert main(["run", "--config", str(bad)]) == 1
    assert "Cannot read config file" in capsys.readouterr().err
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert main(["run", "--config", str(listing)]) == 1
    assert "must hold a mapping" in capsys.readouterr().err


def test_words_yaml_1_1_reads_as_booleans_stay_words_in_sets_and_config_files(tmp_path):
    from gdfo_ray.config import parse_sets, read_config_file

    sets = parse_sets(["harmonize.gate=off", "harmonize.keep_sigma=true", "x=no", "y=False", "z=3", "w=oracle:1"])
    assert sets == {"harmonize.gate": "off", "harmonize.keep_sigma": True, "x": "no", "y": False, "z": 3,
                    "w": "oracle:1"}
    path = tmp_path / "c.yaml"
    path.write_text("harmonize:\n  gate: off\n  keep_sigma: yes\n")
    assert read_config_file(str(path)) == {"harmonize": {"gate": "off", "keep_sigma": "yes"}}


def test_an_off_gate_and_a_yes_for_a_switch_reach_the_config_as_written(tmp_path, capsys):
    assert main(["run", "--method", "bbt", "--set", "harmonize.gate=off", "--set", "harmonize.keep_sigma=yes",
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "harmonize.keep_sigma must be true or false, but got 'yes'" in capsys.readouterr().err


def test_config_file_with_overrides(tmp_path, tiny_config, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    config = tiny_config(method="bbt")
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["run", "--config", str(path), "--budget", "8", "--set", "search.popsize=4"]) == 0
    assert "calls 8/8" in capsys.readouterr().err


def test_run_py_is_the_gdfo_run_entry_point():
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "run.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--budget" in out.stdout


def test_run_py_also_starts_campaigns_sweeps_and_reports():
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "run.py")
    for command, flag in (("bench", "--split-seeds"), ("tune", "--samples"), ("report", "--out")):
        out = subprocess.run([sys.executable, script, command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and flag in out.stdout, out.stderr


def test_bench_and_report_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no cells/ dataset" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--control", str(tmp_path)]) == 1
    assert "--control pairs a ladder's rungs with a shared control: it needs --ladder" in capsys.readouterr().err
    assert main(["bench", "--tasks", "sst2", "--seeds", "x", "--methods", "bbt", "--results", str(tmp_path)]) == 1
    assert "seeds must be integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--tasks", "sst2", "--seeds", "1", "--methods", "bbtv3"])
    assert "invalid choice: 'bbtv3'" in capsys.readouterr().err


def test_a_command_without_optional_flags_runs_on_the_settings_dataclasses_defaults(tmp_path):
    """What ``gdfo bench`` and ``gdfo tune`` build from their required flags alone equals the dataclass built
    from the same required values: a default written into a flag would differ."""
    import argparse

    from gdfo_ray import cli
    from gdfo_ray.campaign import CampaignConfig
    from gdfo_ray.config import build_config_dict
    from gdfo_ray.tune import TuneSettings

    bench = argparse.ArgumentParser()
    cli._Bench().add_arguments(bench)
    args = bench.parse_args(["--tasks", "sst2", "--seeds", "1", "--methods", "bbt", "--results", str(tmp_path)])
    assert cli._Bench.campaign(args) == CampaignConfig(str(tmp_path), ("sst2",), (1,), ("bbt",),
                                                       base=build_config_dict())
    tune = argparse.ArgumentParser()
    cli._Tune().add_arguments(tune)
    settings = cli._Tune.settings(tune.parse_args(["--set", "seed=3"]))
    expected = TuneSettings(build_config_dict(overrides={"pool.backend": "local", "seed": 3}))
    assert settings == expected


def test_resume_takes_the_saved_settings_and_refuses_only_a_flag_that_would_change_them(tmp_path, tiny_config,
                                                                                          crash_after, capsys):
    import yaml

    from gdfo_ray.cli import build_config

    path = tmp_path / "c.yaml"
    config = tiny_config(method="bbt", output_dir=str(tmp_path / "run"))
    path.write_text(yaml.safe_dump(config.to_dict()))
    crash_after(1)
    with pytest.raises(crash_after.error):
        main(["run", "--config", str(path), "--budget", "16"])
    crash_after(None)
    capsys.readouterr()
    # Flags that cannot change the result (where it runs) go with the saved settings.
    assert main(["run", "--output-dir", str(tmp_path / "run"), "--resume", "--budget", "8"]) == 1
    err = capsys.readouterr().err
    assert "--budget would change the saved run (search.budget_calls)" in err
    assert main(["run", "--output-dir", str(tmp_path / "run"), "--resume", "--set", "search.sigma0=0.3"]) == 1
    assert "--set search.sigma0 would change the saved run" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    _Run().add_arguments(parser)
    resumed = build_config(parser.parse_args(["--output-dir", str(tmp_path / "run"), "--resume", "--budget", "16",
                                              "--set", "pool.torch_threads=2"]))
    assert resumed.method == "bbt" and resumed.search.budget_calls == 16 and resumed.pool.torch_threads == 2
    assert main(["run", "--output-dir", str(tmp_path / "run"), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert main(["run", "--output-dir", str(tmp_path / "nothing"), "--resume"]) == 1
    assert "Nothing to resume" in capsys.readouterr().err
