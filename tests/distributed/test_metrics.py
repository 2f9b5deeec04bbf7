"""A run's and a campaign's progress, read back from the node's metrics endpoint as Prometheus would."""

from __future__ import annotations

import re
import socket
import time

import pytest
import requests

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_ray():
    """A local Ray exporting metrics on a known port, every half second."""
    ray = pytest.importorskip("ray")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


def _series(url: str, name: str, **tags) -> dict:
    """``{labels: value}`` of metric ``name`` whose labels include ``tags``."""
    out = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            if all(labels.get(k) == v for k, v in tags.items()):
                out[m.group(2)] = float(m.group(3))
    return out


def _wait_for(url: str, name: str, value: float, timeout: float = 20.0, **tags) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = _series(url, name, **tags)
        if any(abs(v - value) < 1e-6 for v in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_run_exports_its_progress_through_rays_metrics(metrics_ray, tiny_config, tmp_path):
    from gdfo_ray.api import run

    seen = []
    expected = {}

    def check(line: str) -> None:  # during the run, once generation 2 is written
        if line.startswith("gen   2 "):
            calls = int(re.search(r"calls (\d+)/24", line).group(1))
            expected.update({"ray_gdfo_calls_spent": calls, "ray_gdfo_calls_left": 24 - calls,
                             "ray_gdfo_generation": 2})
            tags = {"run": "metered", "task": "sst2", "method": "gdfo"}
            seen.append({name: _wait_for(metrics_ray, name, value, **tags) for name, value in expected.items()})
            seen.append(_series(metrics_ray, "ray_gdfo_best_fitness", **tags))
            seen.append(_series(metrics_ray, "ray_gdfo_calls_total", **tags))

    config = tiny_config(output_dir=str(tmp_path / "metered"), **{"pool.backend": "ray"})
    result = run(config, progress=check)
    assert result.summary["calls"] == 24
    gauges, best, counter = seen
    for name, value in expected.items():
        assert list(gauges[name].values()) == [value], (name, gauges[name])
    assert len(best) == 1 and 0 < next(iter(best.values())) < 10
    # The counter counts the calls this process spent, for rate() in Prometheus.
    assert list(counter.values()) == [expected["ray_gdfo_calls_spent"]]


def test_a_campaign_exports_cells_done_failed_and_left(metrics_ray, tiny_models, tmp_path):
    import json

    from gdfo_ray.campaign import CampaignConfig, run_campaign

    base = {"model": {"teacher": tiny_models["causal"], "dtype": "float32"}, "task": {"max_test_examples": 4},
            "prompt": {"intrinsic_dim": 4, "n_prompt_tokens": 2}, "search": {"popsize": 4},
            "pool": {"backend": "local", "torch_threads": 1}}
    data = tmp_path / "data"
    for seed in (13, 42):
        d = data / "sst2" / "16-shot" / str(seed)
        d.mkdir(parents=True)
        for split in ("train", "dev"):
            (d / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": f"it was {w}", "label": i % 2})
                                                       for i, w in enumerate(["bad", "good"] * 2)))
    (data / "sst2" / "test.jsonl").write_text("\n".join(json.dumps({"text": w, "label": i % 2})
                                                        for i, w in enumerate(["bad", "great"] * 3)))
    base["task"]["data_dir"] = str(data)
    campaign = CampaignConfig(tasks=("sst2",), methods=("manual",), seeds=(13, 42), budget=8,
                              results_dir=str(tmp_path / "camp"), base=base)
    run_campaign(campaign, say=lambda _: None)
    for name, value in (("done", 2), ("left", 0), ("failed", 0)):
        found = _wait_for(metrics_ray, f"ray_gdfo_campaign_cells_{name}", value, campaign="camp")
        assert list(found.values()) == [value], (name, found)
