"""Ray Jobs for real: a Ray head started with ``ray start`` in its own process (dashboard, job agent,
working-dir upload, token auth), and ``run.py``, ``bench`` and ``tune`` submitted to it through the
Jobs API, as the README tells users to. A job stopped midway resumes with ``--resume``. Nothing
written by any job (run directories, Parquet results, Tune's experiment state, job and session
logs) contains the service's token.

The head uses free ports and its own temporary directory, and only it is shut down (SIGTERM to
its ``ray start --block`` process, then any process still naming its temporary directory): never
a machine-wide ``ray stop``.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
import requests

from gdfo_ray.serve import ServeConfig, start_in_thread

pytestmark = [pytest.mark.ray, pytest.mark.ray_jobs]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: run.py and the package
SERVE_TOKEN = "jobs-serve-" + secrets.token_hex(12)
RAY_TOKEN = secrets.token_hex(16)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    url: str
    temp_dir: str
    client: object
    jobs: list

    def submit(self, args: list[str], job_id: str) -> str:
        entrypoint = " ".join(["python", "run.py", *args])
        self.jobs.append(self.client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                                                runtime_env={"working_dir": REPO}))
        return job_id

    def wait(self, job_id: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.get_job_status(job_id)
            if status.is_terminal():
                return str(status)
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s:\n{self.client.get_job_logs(job_id)[-3000:]}")

    def succeed(self, args: list[str], job_id: str) -> str:
        status = self.wait(self.submit(args, job_id))
        logs = self.client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-4000:]
        return logs


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # ray start --block drains and stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in psutil.process_iter(["pid", "cmdline"]):  # leftovers of this head only
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head():
    from ray.job_submission import JobSubmissionClient

    # Short: Ray's socket paths live under the temp dir and must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="gdfo-rj-", dir="/tmp")
    gcs, dashboard, client_port, agent = _free_ports(4)
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN, GDFO_TEACHER_TOKEN=SERVE_TOKEN,
               PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
         "--temp-dir", temp_dir, "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    url = f"http://127.0.0.1:{dashboard}"
    headers = {"Authorization": f"Bearer {RAY_TOKEN}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(os.path.join(temp_dir, "head.log")).read()[-3000:]
            try:
                if requests.get(url + "/api/version", headers=headers, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the Ray head's dashboard did not come up in 120 s"
            time.sleep(1)
        client = JobSubmissionClient(url, headers=headers)
        yield Head(url, temp_dir, client, [])
    finally:
        _stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def service(tiny_models):
    with start_in_thread(ServeConfig(model=tiny_models["causal"], port=0, token=SERVE_TOKEN, threads=1,
                                     dtype="float32")) as handle:
        yield handle


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("job_outputs")


def _tiny(service, tiny_models, data_dir) -> list[str]:
    sets = {"model.teacher": service.url, "model.student": tiny_models["encoder"], "model.dtype": "float32",
            "task.data_dir": data_dir, "prompt.intrinsic_dim": 4, "prompt.n_prompt_tokens": 2,
            "search.popsize": 4, "search.eval_every_calls": 8, "student.k_steps": 1, "student.batch_rows": 8,
            "student.precision": "float32", "pool.torch_threads": 1}
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


def test_run_py_as_a_job_writes_its_results(ray_head, service, tiny_models, tiny_data_dir, outputs):
    out = outputs / "run"
    billed = service.stats().get("billed", 0)
    logs = ray_head.succeed(["--task", "sst2", "--seed", "42", "--method", "gdfo", "--budget", "12",
                             "--output-dir", str(out), *_tiny(service, tiny_models, tiny_data_dir),
                             "--set", "pool.n_teacher_actors=1"], "gdfo-run")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"] == 12 and summary["method"] == "gdfo"
    assert len(pq.read_table(out / "history.parquet")) == summary["generations"] == 3
    assert "[gdfo] results in" in logs
    # Every call the service billed was one the run counted: train, dev, and the two test scorings.
    assert service.stats()["billed"] - billed == summary["calls"] + summary["dev_calls"] + 2


def test_bench_submitted_with_the_ray_job_cli_fills_its_dataset(ray_head, service, tiny_models, tiny_data_dir,
                                                                 outputs):
    """The README's command: ``ray job submit --address ... --working-dir . -- python run.py ...``."""
    results = outputs / "campaign"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)  # what a user of a token-auth cluster sets
    cli = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", ray_head.url,
         "--working-dir", ".", "--submission-id", "gdfo-bench", "--", "python", "run.py", "bench",
         "--tasks", "sst2", "--seeds", "42", "--methods", "manual", "bbt", "--budget", "8", "--results", str(results),
         "--cell-cpus", "1", *_tiny(service, tiny_models, tiny_data_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    ray_head.jobs.append("gdfo-bench")
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert str(ray_head.client.get_job_status("gdfo-bench")) == "SUCCEEDED"
    logs = ray_head.client.get_job_logs("gdfo-bench")
    cells = sorted(glob.glob(str(results / "cells" / "*" / "*" / "*.parquet")))
    assert [c.split("cells/")[1] for c in cells] == ["task=sst2/method=bbt/seed-42.parquet",
                                                     "task=sst2/method=manual/seed-42.parquet"]
    assert "2 cells: 0 finished before, 2 to run" in logs


def test_tune_as_a_job_writes_its_trials(ray_head, service, tiny_models, tiny_data_dir, outputs):
    storage = outputs / "tune"
    ray_head.succeed(["tune", "--task", "sst2", "--method", "bbt", "--budget", "8", "--samples", "2",
                      "--name", "sweep", "--storage", str(storage), "--trial-cpus", "1",
                      *_tiny(service, tiny_models, tiny_data_dir)], "gdfo-tune")
    trials = pq.read_table(storage / "sweep" / "trials.parquet").to_pylist()
    assert len(trials) == 2 and all(t["status"] == "FINISHED" for t in trials)
    assert (storage / "sweep" / "best_config.yaml").exists()


def test_a_stopped_job_resumes_with_resume(ray_head, service, tiny_models, tiny_data_dir, outputs):
    out = outputs / "stopped"
    args = ["--task", "sst2", "--seed", "42", "--method", "bbt", "--budget", "240", "--output-dir", str(out),
            *_tiny(service, tiny_models, tiny_data_dir), "--set", "pool.calls_per_s=16"]  # >= 15 s of calls
    ray_head.submit(args, "gdfo-stop")
    deadline = time.monotonic() + 180
    while not (out / "history.parquet").exists():
        assert time.monotonic() < deadline, ray_head.client.get_job_logs("gdfo-stop")[-3000:]
        assert not ray_head.client.get_job_status("gdfo-stop").is_terminal(), \
            ray_head.client.get_job_logs("gdfo-stop")[-3000:]
        time.sleep(0.2)
    ray_head.client.stop_job("gdfo-stop")
    assert ray_head.wait("gdfo-stop") == "STOPPED"
    done = len(pq.read_table(out / "history.parquet"))
    assert 0 < done < 60 and not (out / "summary.json").exists()

    logs = ray_head.succeed([*args, "--resume"], "gdfo-resume")
    assert f"resuming {out} after generation" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"] == 240 and summary["generations"] == 60


def test_a_job_with_bad_input_fails_with_the_message_that_fixes_it(ray_head, service, tiny_models, tiny_data_dir,
                                                                   outputs):
    ray_head.submit(["--task", "sst2", "--budget", "8", "--output-dir", str(outputs / "bad"),
                     *_tiny(service, tiny_models, tiny_data_dir), "--set", "search.popsize=1"], "gdfo-bad")
    assert ray_head.wait("gdfo-bad", timeout=120) == "FAILED"
    logs = ray_head.client.get_job_logs("gdfo-bad")
    assert "search.popsize must be an integer >= 2" in logs and "Traceback" not in logs, logs[-2000:]
    assert not (outputs / "bad" / "checkpoint.pkl").exists()


def test_no_secret_reaches_what_jobs_wrote(ray_head, outputs):
    """Run dirs, Parquet, Tune's state, job logs and the session's logs: neither token appears."""
    assert len(ray_head.jobs) >= 5, "run after the job tests of this module"
    leaks = []
    for root in (str(outputs), os.path.join(ray_head.temp_dir, "session_latest", "logs")):
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                raw = f.read()
            texts = [raw]
            if path.endswith(".parquet"):  # compressed pages: look at the values too
                texts.append(repr(pq.read_table(path).to_pylist()).encode())
            for name, secret in (("service token", SERVE_TOKEN), ("Ray token", RAY_TOKEN)):
                if any(secret.encode() in t for t in texts):
                    leaks.append(f"{name} in {path}")
    for job in ray_head.jobs:
        logs = ray_head.client.get_job_logs(job)
        if SERVE_TOKEN in logs:
            leaks.append(f"service token in the logs of job {job}")
        info = ray_head.client.get_job_info(job)
        if SERVE_TOKEN in json.dumps(info.runtime_env or {}) + str(info.entrypoint):
            leaks.append(f"service token in the job record of {job}")
    assert not leaks, leaks
