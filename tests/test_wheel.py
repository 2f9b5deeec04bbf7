"""The package as a user installs it: a wheel built from the project's files, run from outside the repository."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --target`` of a freshly built wheel; its ``gdfo`` script and the folder to put on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "gdfo_ray"), src / "gdfo_ray",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    isolation = []
    try:  # the venv's own setuptools builds it offline where it is recent enough; else pip fetches one
        if int(importlib.metadata.version("setuptools").split(".")[0]) >= 68:
            isolation = ["--no-build-isolation"]
    except importlib.metadata.PackageNotFoundError:
        pass
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("gdfo_ray-*.whl")
    site = tmp / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k != "GDFO_DATA_DIR"}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install of the checkout
    return site, env, tmp


def test_the_wheel_holds_the_package_and_its_data(installed):
    site, env, tmp = installed
    out = subprocess.run([sys.executable, "-c", "import gdfo_ray, gdfo_ray.tasks as t; print(gdfo_ray.__file__); "
                          "print(t.PACKAGED_DATA_DIR)"], capture_output=True, text=True, env=env, cwd=tmp)
    module, data_dir = out.stdout.split()
    assert module.startswith(str(site)) and data_dir.startswith(str(site))
    assert os.path.isfile(os.path.join(data_dir, "sst2", "16-shot", "42", "train.jsonl"))
    assert os.path.isfile(os.path.join(data_dir, "README.md"))
    help_text = subprocess.run([str(site / "bin" / "gdfo"), "--help"], capture_output=True, text=True, env=env).stdout
    for command in ("run", "bench", "tune", "report", "serve"):
        assert command in help_text


def test_the_installed_gdfo_runs_the_default_task_from_its_packaged_data(installed, tiny_models):
    site, env, tmp = installed
    out = tmp / "run"
    done = subprocess.run(
        [str(site / "bin" / "gdfo"), "run", "--teacher", tiny_models["causal"], "--budget", "8", "--backend", "local",
         "--output-dir", str(out), "--set", "search.popsize=4", "--set", "prompt.intrinsic_dim=8",
         "--set", "prompt.n_prompt_tokens=2", "--set", "task.max_test_examples=16", "--set", "task.max_text_tokens=32",
         "--set", "model.dtype=float32"],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "32 train / 32 dev / 16 test rows from the gdfo_ray package's own copy of sst2" in done.stderr
    assert (out / "summary.json").is_file()
