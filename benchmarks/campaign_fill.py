"""How a campaign fills a machine: cells at once against torch threads per cell.

A campaign's cells are independent runs. On C cores they can run as one cell at a
time on C threads, or as C/t cells at once on t threads each. This measures, for the
default teacher on one population x the SST-2 training batch, the calls per second
the whole machine reaches each way (every cell a separate process, started together),
and the floor (the call's arithmetic over the matrix-multiply rate of the machine's
cores, measured on all of them). It prints the split that the campaign's rule
(:func:`gdfo_ray.campaign.cell_threads`) picks, so the rule can be checked on each
machine. Example::

    python benchmarks/campaign_fill.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

WORKER = r"""
import json, sys, time
import numpy as np, torch
sys.path.insert(0, {bench!r})
from throughput import build, population
args = type("A", (), dict(task="sst2", teacher={teacher!r}, prompt_tokens=10, rows_per_forward=None,
                          tokens_per_forward=None, popsize={popsize}))()
torch.set_num_threads({threads})
config, data, teacher = build(args, "fp32")
ids = np.arange(len(data.train))
prompts = population(args, teacher.lm.hidden_size, teacher.lm.embedding_std())
teacher.query(prompts[:2], "train", ids)
flops = teacher.flops_per_call("train", ids)
print("READY", flush=True)
sys.stdin.readline()  # every worker starts timing together
t0 = time.perf_counter()
for _ in range({repeats}):
    teacher.query(prompts, "train", ids)
print(json.dumps({{"s_per_call": (time.perf_counter() - t0) / ({repeats} * len(prompts)), "flops": flops}}), flush=True)
"""


def measure(cells: int, threads: int, args) -> dict:
    """Seconds per call in each of ``cells`` processes of ``threads`` threads, timed over the same window."""
    code = WORKER.format(bench=os.path.dirname(os.path.abspath(__file__)), teacher=args.teacher,
                         popsize=args.popsize, threads=threads, repeats=args.repeats)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(cells)]
    try:
        for p in procs:
            while (line := p.stdout.readline()) and not line.startswith("READY"):
                pass
            if not line:
                raise RuntimeError(f"a worker ({cells} x {threads} threads) ended before it was ready")
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.stdout.readline()) for p in procs]
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.wait(timeout=600)
    calls = cells * args.repeats * args.popsize
    return {"cells": cells, "threads": threads, "calls_per_s": calls / wall,
            "s_per_call": float(np.mean([o["s_per_call"] for o in outs])), "flops": outs[0]["flops"]}


def main(argv=None) -> int:
    from gdfo_ray.campaign import cell_threads
    from gdfo_ray.machine import cores_available, cpu_name, matmul_rate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--popsize", type=int, default=17)
    p.add_argument("--repeats", type=int, default=2, help="populations each cell scores in the timed window")
    args = p.parse_args(argv)
    import torch

    cores = cores_available()
    torch.set_num_threads(cores)
    rate = matmul_rate("float32", seconds=2.0)
    print(f"# {cpu_name()}, {cores} cores, torch {torch.__version__}; float32 matmul on {cores} threads: "
          f"{rate / 1e9:.0f} GFLOP/s")
    splits = [(cores // t, t) for t in range(cores, 0, -1) if cores % t == 0]
    rows = [measure(c, t, args) for c, t in splits]
    alone = measure(1, 1, args)  # one thread with the machine to itself: what sharing the cores costs a cell
    floor = rows[0]["flops"] / rate  # seconds a call needs on the whole machine
    print(f"\nSST-2, {args.popsize} prompts x 32 examples a call, float32; the floor is {rows[0]['flops'] / 1e9:.1f} "
          f"GFLOP a call over the {cores}-core rate: {1 / floor:.2f} calls/s\n")
    print("| cells at once | threads per cell | s per call in a cell | calls/s, whole machine | x floor |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']} | {r['threads']} | {r['s_per_call']:.3f} | {r['calls_per_s']:.3f} | "
              f"{(1 / r['calls_per_s']) / floor:.2f} |")
    print(f"| 1 (alone, the reference) | 1 | {alone['s_per_call']:.3f} | {alone['calls_per_s']:.3f} | "
          f"{(1 / alone['calls_per_s']) / floor:.2f} |")
    best = max(rows, key=lambda r: r["calls_per_s"])
    rule = cell_threads(cores)
    print(f"\nfastest here: {best['cells']} cell(s) x {best['threads']} thread(s); the campaign's default "
          f"(campaign.cell_threads): {cores // rule} cell(s) x {rule} thread(s)"
          + ("" if (cores // rule, rule) == (best["cells"], best["threads"]) else
             f"; pass --cell-cpus {best['threads']} to gdfo bench on this machine"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
