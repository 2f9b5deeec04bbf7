"""Teacher-pool throughput against a simulated remote black box, and the cost of the HTTP path.

Part 1 starts ``gdfo serve --simulate-latency L --rate-limit R`` in its own process
(a remote service with fixed latency L and a rate limit R that answers 429 above
it) and measures the calls/s a Ray teacher pool achieves with N calls in flight,
for N = 1..64, against the ideal min(R, N/L). The pool shares one rate limiter
set to R, so the service should never have to refuse. Every measurement charges
a budget before dispatch; the service's count of billed calls must equal it
(zero overruns). Pool size N is ``actors x calls_per_actor`` (``--max-actors``
caps the processes; each actor keeps the rest of its slots in threads).

Part 2 times one call of the default teacher on one SST-2 batch in-process and
through ``gdfo serve`` on loopback, and the bare HTTP round trip (encode, send,
validate, decode) against a simulated service with zero latency.

    GDFO_DATA_DIR=../shared/data python benchmarks/pool_scaling.py
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np
import requests

TOKEN = "pool-scaling-benchmark"


def start_service(args: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "GDFO_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "gdfo_ray.cli", "serve", "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    deadline = time.time() + 300
    while " on http://" not in line:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"gdfo serve did not start: {line}")
    return proc, line.split(" on ")[-1].strip()


def stats(url: str) -> dict:
    return requests.get(url + "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()


def pool_scaling(args: argparse.Namespace, data) -> list[dict]:
    import ray

    from gdfo_ray.budget import CallBudget
    from gdfo_ray.config import GDFOConfig
    from gdfo_ray.distributed import make_ray_teacher_pool, release_ray_pools

    # The service enforces R over 100 ms windows (burst R/10), as services count per window; the pool
    # paces itself at R with a smaller burst, so network jitter does not turn into 429s.
    service_burst = max(args.burst, math.ceil(args.rate / 10))
    proc, url = start_service(["--simulate-latency", str(args.latency), "--rate-limit", str(args.rate),
                               "--rate-burst", str(service_burst), "--simulate-hidden", str(args.hidden)])
    os.environ["GDFO_TEACHER_TOKEN"] = TOKEN
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        hidden = requests.get(url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        h = hidden["hidden_size"]
        rng = np.random.default_rng(0)
        for n in args.sizes:
            actors = min(n, args.max_actors)
            config = GDFOConfig.from_dict({
                "model": {"teacher": url}, "task": {"name": "sst2"},
                "pool": {"n_teacher_actors": actors, "calls_per_actor": math.ceil(n / actors),
                         "teacher_num_cpus": 0.0, "calls_per_s": None if args.no_limiter else args.rate,
                         "rate_burst": args.burst},
                "service": {"max_retries": 8},
            })
            pool = make_ray_teacher_pool(config, data)
            ids = np.arange(len(data.train))
            ideal = min(args.rate, n / args.latency)
            calls = max(4 * n, int(ideal * args.seconds))
            budget = CallBudget(total=calls + n)
            before = stats(url)
            budget.charge(n)  # warm-up: actors connect, the limiter starts
            pool.query(rng.normal(size=(n, args.prompt_tokens, h)).astype(np.float32), "train", ids)
            prompts = rng.normal(size=(calls, args.prompt_tokens, h)).astype(np.float32)
            budget.charge(calls)
            t0 = time.perf_counter()
            logits = pool.query(prompts, "train", ids)
            wall = time.perf_counter() - t0
            after = stats(url)
            assert logits.shape == (calls, len(ids), 2)
            billed = after.get("billed", 0) - before.get("billed", 0)
            retried = sum(s.get("retries", 0) for s in pool.stats())
            rows.append({"N": n, "actors": actors, "calls": calls, "ideal": ideal, "achieved": calls / wall,
                         "ratio": calls / wall / ideal, "billed": billed, "charged": budget.spent,
                         "overrun": billed - budget.spent, "429s": after.get("rate_limited", 0)
                         - before.get("rate_limited", 0), "retries": retried})
            r = rows[-1]
            print(f"N={n:3d} ({actors} actors x {math.ceil(n / actors)}): {r['achieved']:7.1f} calls/s of ideal "
                  f"{ideal:6.1f} ({r['ratio']:.1%}); billed {billed} / charged {budget.spent}; 429s {r['429s']}",
                  file=sys.stderr, flush=True)
            release_ray_pools(pool)
    finally:
        ray.shutdown()
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def http_vs_in_process(args: argparse.Namespace, data) -> dict:
    from gdfo_ray.config import GDFOConfig
    from gdfo_ray.teachers.http import HttpTeacher
    from gdfo_ray.teachers.local import LocalTeacher

    out = {}
    ids = np.arange(len(data.train))
    base = {"task": {"name": "sst2", "max_text_tokens": 64}, "model": {"max_rows_per_forward": 256}}

    def median_call(teacher, prompt, repeats: int) -> float:
        teacher.query(prompt[None], "train", ids)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            teacher.query(prompt[None], "train", ids)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    # The bare transport: zero-latency simulated service, the prompt the default teacher takes.
    proc, url = start_service(["--simulate-latency", "0", "--simulate-hidden", str(args.hidden)])
    try:
        config = GDFOConfig.from_dict({**base, "model": {"teacher": url}})
        teacher = HttpTeacher(config, data, token=TOKEN)
        h = teacher.describe().hidden_size
        out["transport_ms"] = 1000 * median_call(teacher, np.zeros((args.prompt_tokens, h), np.float32), 50)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if args.skip_model:
        return out
    config = GDFOConfig.from_dict({**base, "model": {"teacher": args.model}, "pool": {"torch_threads": 0}})
    local = LocalTeacher(config, data)
    prompt = np.random.default_rng(0).normal(size=(args.prompt_tokens, local.describe().hidden_size)) * 0.02
    prompt = prompt.astype(np.float32)
    out["in_process_s"] = median_call(local, prompt, args.repeats)
    del local
    proc, url = start_service(["--model", args.model, "--max-text-tokens", "64"])
    try:
        teacher = HttpTeacher(GDFOConfig.from_dict({**base, "model": {"teacher": url}}), data, token=TOKEN)
        out["http_s"] = median_call(teacher, prompt, args.repeats)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.1, help="L: the simulated service's latency (s)")
    p.add_argument("--rate", type=float, default=200.0, help="R: its rate limit (calls/s), also the pool's")
    p.add_argument("--burst", type=int, default=4, help="burst the service and the pool allow")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--max-actors", type=int, default=64, help="processes; further slots are threads in them")
    p.add_argument("--seconds", type=float, default=3.0, help="target length of each measurement")
    p.add_argument("--prompt-tokens", type=int, default=10)
    p.add_argument("--hidden", type=int, default=576, help="the simulated model's hidden size (SmolLM2's)")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="teacher for part 2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-model", action="store_true", help="part 2 without the real model")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--no-limiter", action="store_true", help="the pool does not pace itself (the service still does)")
    args = p.parse_args(argv)

    from gdfo_ray.config import TaskConfig
    from gdfo_ray.tasks import load_task

    data = load_task(TaskConfig(name="sst2", max_text_tokens=64), seed=42)
    print(f"# pool scaling: L={args.latency}s, R={args.rate}/s, burst {args.burst}, {len(data.train)} inputs "
          f"per call, {os.cpu_count()} cores")
    if not args.skip_scaling:
        rows = pool_scaling(args, data)
        print("| N in flight | actors x threads | calls | ideal calls/s | achieved | of ideal | billed | charged | "
              "overrun | 429s | retries |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['N']} | {r['actors']} x {math.ceil(r['N'] / r['actors'])} | {r['calls']} | {r['ideal']:.1f} | "
                  f"{r['achieved']:.1f} | {r['ratio']:.1%} | {r['billed']} | {r['charged']} | {r['overrun']} | "
                  f"{r['429s']} | {r['retries']} |")
    costs = http_vs_in_process(args, data)
    print("\n# one call, one SST-2 batch (%d inputs)" % len(data.train))
    print(f"bare HTTP round trip (simulated, 0 latency): {costs['transport_ms']:.1f} ms")
    if "http_s" in costs:
        print(f"{args.model}: in-process {costs['in_process_s']:.3f} s, through gdfo serve {costs['http_s']:.3f} s "
              f"(+{1000 * (costs['http_s'] - costs['in_process_s']):.0f} ms, "
              f"{costs['http_s'] / costs['in_process_s'] - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
