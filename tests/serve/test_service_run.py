"""A run against a real ``gdfo serve`` process: calls split to its limits, an outage waited out, ``--resume`` alone.

The service runs as its own process on a port fixed for the module, so that it can be
killed (SIGKILL, as a crash) and started again where the run expects it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import yaml

from gdfo_ray.serve import wait_until_healthy
from killing import kill_at_generation

TOKEN = "test-token-123"
MAX_INPUTS = 5  # below the tiny task's 8 dev and 12 test rows: every dev and test call is split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``gdfo serve`` on the tiny causal LM as a child process; :meth:`kill` and :meth:`start` again on one port."""

    def __init__(self, model: str, port: int):
        self.model, self.port = model, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "GDFO_SERVE_TOKEN": TOKEN}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gdfo_ray.cli", "serve", "--model", self.model, "--port", str(self.port),
             "--threads", "1", "--dtype", "float32", "--max-inputs", str(MAX_INPUTS), "--shutdown-grace", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_until_healthy(self.url, self.proc, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stats(self) -> dict:
        return requests.get(self.url + "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()


@pytest.fixture(scope="module")
def served(tiny_models):
    service = ServeProcess(tiny_models["causal"], _free_port())
    service.start()
    yield service
    service.kill()


@pytest.fixture
def remote_config(tiny_config, served, monkeypatch):
    """The tiny run against the served process, with a client that gives up quickly on a single call."""
    monkeypatch.setenv("GDFO_TEACHER_TOKEN", TOKEN)

    def build(**overrides):
        return tiny_config(**{"model.teacher": served.url, "service.max_retries": 2, "service.backoff_s": 0.05,
                              "service.backoff_max_s": 0.2, "service.probe_max_s": 0.5, **overrides})

    return build


def test_a_call_on_more_rows_than_the_service_takes_goes_in_pieces_with_the_local_logits(remote_config, tiny_config,
                                                                                         served):
    from gdfo_ray.teachers.http import HttpTeacher
    from gdfo_ray.teachers.local import LocalTeacher
    from gdfo_ray.tasks import load_task

    config = remote_config()
    data = load_task(config.task, config.seed)
    prompts = np.random.default_rng(3).normal(size=(2, 2, 32)).astype(np.float32)
    rows = np.arange(len(data.test))  # 12 rows: pieces of 5, 5 and 2
    teacher = HttpTeacher(config, data)
    teacher.check()
    before = served.stats().get("billed", 0)
    remote = teacher.query(prompts, "test", rows, ["call-a", "call-b"])
    assert served.stats()["billed"] - before == 6
    local = LocalTeacher(tiny_config(), data).query(prompts, "test", rows)
    np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-5)
    # Every piece has a key of its own, derived from its call's: sent again, none is billed twice.
    again = teacher.query(prompts, "test", rows, ["call-a", "call-b"])
    np.testing.assert_array_equal(again, remote)
    assert served.stats()["billed"] - before == 6


def test_a_run_scores_splits_larger_than_the_service_takes(remote_config, tiny_config, tmp_path):
    from gdfo_ray.api import run

    remote = run(remote_config(output_dir=str(tmp_path / "remote")), progress=None)
    local = run(tiny_config(output_dir=str(tmp_path / "local")), progress=None)
    assert remote.summary["test"] == pytest.approx(local.summary["test"])
    assert remote.summary["calls"] == 24


@pytest.mark.parametrize("overrides,message", [
    ({"task.max_text_tokens": 1000}, r"task.max_text_tokens=1000 is over the service's max_text_tokens=128"),
    ({"prompt.n_prompt_tokens": 300}, r"prompt.n_prompt_tokens=300 is over the service's max_prompt_tokens"),
    ({"task.verbalizer": ["very bad", "good"]}, r"refuses this task's calls.*verbalizer"),
], ids=["text-tokens", "prompt-tokens", "verbalizer"])
def test_what_the_service_would_refuse_stops_the_run_before_its_first_paid_call(remote_config, served, tmp_path,
                                                                               overrides, message):
    from gdfo_ray.api import run
    from gdfo_ray.exceptions import TeacherError

    before = served.stats().get("billed", 0)
    with pytest.raises(TeacherError, match=message):
        run(remote_config(output_dir=str(tmp_path / "r"), **overrides), progress=None)
    assert served.stats().get("billed", 0) == before


def test_a_text_longer_than_the_service_takes_is_refused_at_start_and_task_max_text_chars_cuts_it(
        remote_config, served, tmp_path, tiny_data_dir):
    import json

    from gdfo_ray.api import run
    from gdfo_ray.exceptions import TeacherError

    rows = [{"text": "the movie was good " * (300 if i == 3 else 1), "label": i % 2} for i in range(8)]
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    files = {f"task.{n}_file": str(tmp_path / f"{n}.jsonl") for n in ("train", "dev", "test")}
    before = served.stats().get("billed", 0)
    with pytest.raises(TeacherError, match=r"Row 3 of the train split has a text of 5700 characters; the service "
                                           r"takes at most 4000 .* Set task.max_text_chars=4000"):
        run(remote_config(output_dir=str(tmp_path / "a"), **files), progress=None)
    assert served.stats().get("billed", 0) == before
    done = run(remote_config(output_dir=str(tmp_path / "b"), **files,
                                **{"task.max_text_chars": 4000, "task.max_text_tokens": 40}), progress=None)
    assert done.summary["calls"] == 24


def test_the_service_killed_mid_run_and_back_on_its_port_is_waited_out(remote_config, served, tmp_path, capsys):
    from gdfo_ray.api import run

    reference = run(remote_config(output_dir=str(tmp_path / "ref")), progress=None)
    restarted = threading.Event()

    def progress(line: str) -> None:
        print(line, file=sys.stderr)
        if line.startswith("gen   1 ") and not restarted.is_set():
            served.kill()  # a crash: connections refused until it is back

            def back() -> None:
                time.sleep(2.0)
                served.start()
                restarted.set()

            threading.Thread(target=back, daemon=True).start()

    result = run(remote_config(output_dir=str(tmp_path / "cut")), progress=progress)
    assert restarted.is_set()
    assert result.summary["calls"] == reference.summary["calls"] == 24  # exactly the budget, nothing charged twice
    assert [r["fitness_best"] for r in result.history] == pytest.approx(
        [r["fitness_best"] for r in reference.history], rel=1e-5)
    assert result.summary["test"] == pytest.approx(reference.summary["test"])
    err = capsys.readouterr().err
    assert "is not answering" in err and "the run pauses and waits for it" in err
    assert "is back after" in err


def test_resume_alone_after_the_driver_is_killed_takes_the_saved_settings(remote_config, served, tmp_path):
    from gdfo_ray.api import run

    config = remote_config(output_dir=str(tmp_path / "killed"), **{"search.budget_calls": 160})
    before = served.stats().get("billed", 0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "GDFO_TEACHER_TOKEN": TOKEN}
    kill_at_generation([sys.executable, "-m", "gdfo_ray.cli", "run", "--config", str(tmp_path / "run.yaml")], 3, env=env)
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "gdfo_ray.cli", "run", "--output-dir", str(tmp_path / "killed"),
                              "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    billed_cut = served.stats()["billed"] - before
    reference = run(config.with_overrides({"output_dir": str(tmp_path / "ref")}), progress=None)
    import json

    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["calls"] == 160
    assert summary["test"] == pytest.approx(reference.summary["test"])
    # The generation the kill cut short was asked again under the same call ids: answered from the service's
    # idempotency cache, so the interrupted run was billed exactly what the uninterrupted one was.
    assert billed_cut == served.stats()["billed"] - before - billed_cut
