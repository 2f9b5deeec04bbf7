"""Memory: the peak of a default run, how one call's peak grows, and whether a long run grows at all.

1. Peak resident memory of ``gdfo run`` on the embedded defaults (fewer calls, same shapes).
2. Peak resident memory of one teacher call (default teacher) against population,
   batch and prompt length, each in a fresh process.
3. Resident memory after every generation of a long GDFO run with the default
   student against a simulated service (so that the run is long in generations,
   not in hours): it must level off once the replay buffer is full.

    GDFO_DATA_DIR=../shared/data python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

PROBE = r"""
import json, resource, sys
import numpy as np
from gdfo_ray.config import GDFOConfig
from gdfo_ray.teachers.local import LocalTeacher
from gdfo_ray.tasks import load_task
popsize, batch, n, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = GDFOConfig.from_dict({"task": {"name": "ag_news"}, "model": {"dtype": dtype},
                               "prompt": {"n_prompt_tokens": n}, "pool": {"backend": "local"}})
data = load_task(config.task, config.seed)
teacher = LocalTeacher(config, data)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = np.arange(len(data.train))[:batch]
prompts = np.random.default_rng(0).normal(size=(popsize, n, teacher.lm.hidden_size)).astype(np.float32) * 0.02
teacher.query(prompts, "train", ids)
print(json.dumps({"loaded_mb": loaded / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def default_run_peak(budget: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "gdfo_ray.cli", "run", "--backend", "local", "--budget", str(budget),
                        "--output-dir", out], check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def call_peak(popsize: int, batch: int, n: int, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(popsize), str(batch), str(n), dtype], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def long_run(generations: int, buffer_candidates: int) -> list[float]:
    from gdfo_ray.api import run
    from gdfo_ray.config import GDFOConfig
    from gdfo_ray.serve import ServeConfig, start_in_thread

    token = "memory-benchmark-token"
    os.environ["GDFO_TEACHER_TOKEN"] = token
    samples: list[float] = []
    with start_in_thread(ServeConfig(simulate_latency_s=0.0, simulate_hidden=576, port=0, token=token)) as service, \
            tempfile.TemporaryDirectory() as out:
        config = GDFOConfig.from_dict({
            "output_dir": out, "model": {"teacher": service.url},
            "task": {"name": "sst2", "max_test_examples": 16},
            "search": {"budget_calls": 17 * generations, "eval_every_calls": 10**6},
            "student": {"buffer_candidates": buffer_candidates}, "pool": {"backend": "local"},
        })
        run(config, progress=lambda line: samples.append(rss_mb()) if line.startswith("gen") else None)
    return samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=34, help="calls of the default run in part 1 (2 generations)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--buffer", type=int, default=100, help="replay buffer bound (candidates) in part 3")
    p.add_argument("--skip", nargs="*", default=[], choices=["default", "calls", "long"])
    args = p.parse_args(argv)

    if "default" not in args.skip:
        print(f"1. peak RSS of `gdfo run --backend local --budget {args.budget}` (defaults otherwise): "
              f"{default_run_peak(args.budget):.0f} MB", flush=True)
    if "calls" not in args.skip:
        print("\n2. one teacher call on AG News (default teacher), peak RSS of a fresh process\n")
        print("| population | batch | prompt tokens | rows | after loading (MB) | peak (MB) | call's own (MB) |")
        print("|---|---|---|---|---|---|---|")
        for popsize, batch, n in [(4, 32, 10), (17, 32, 10), (34, 32, 10), (68, 32, 10), (17, 8, 10), (17, 64, 10),
                                  (17, 32, 5), (17, 32, 50), (17, 32, 100)]:
            r = call_peak(popsize, batch, n, args.dtype)
            print(f"| {popsize} | {batch} | {n} | {popsize * batch} | {r['loaded_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] - r['loaded_mb']:.0f} |", flush=True)
    if "long" not in args.skip:
        samples = long_run(args.generations, args.buffer)
        full_at = -(-args.buffer // 17)
        print(f"\n3. RSS after each generation, {args.generations} generations, buffer bound {args.buffer} candidates "
              f"(full after generation {full_at})\n")
        marks = sorted({1, full_at, min(2 * full_at, len(samples)), len(samples) // 2, len(samples)})
        print("| generation | " + " | ".join(str(m) for m in marks) + " |")
        print("|---|" + "---|" * len(marks))
        print("| RSS (MB) | " + " | ".join(f"{samples[m - 1]:.0f}" for m in marks) + " |")
        tail = samples[len(samples) // 2:]
        print(f"\nsecond half of the run: RSS from {tail[0]:.0f} to {tail[-1]:.0f} MB "
              f"(slope {(tail[-1] - tail[0]) / max(1, len(tail) - 1):+.2f} MB per generation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
