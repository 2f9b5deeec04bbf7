import os
import sys

import pytest

from gdfo_ray.cli import main


def test_bad_input_exits_1_with_a_message(capsys):
    assert main(["run", "--set", "search.popsiz=3"]) == 1
    assert "Similar valid keys: ['popsize']" in capsys.readouterr().err
    assert main(["run", "--task", "nope", "--backend", "local"]) == 1
    assert "is not a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--method", "sgd"])


def test_config_file_with_overrides(tmp_path, tiny_config, capsys):
    import yaml

    from gdfo_ray.cli import build_config, main as cli_main

    path = tmp_path / "c.yaml"
    config = tiny_config(method="bbt")
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert cli_main(["run", "--config", str(path), "--budget", "8", "--set", "search.popsize=4"]) == 0
    assert "calls 8/8" in capsys.readouterr().err


def test_library_core_does_not_import_ray():
    import subprocess

    code = "import sys, gdfo_ray.driver, gdfo_ray.api, gdfo_ray.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_py_is_the_gdfo_run_entry_point():
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "run.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--budget" in out.stdout
