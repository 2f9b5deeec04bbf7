"""Where a student step's time goes: K distillation steps timed in float32 and in bfloat16, and the
share of the torch profiler's self time spent in matrix products.

It replays the first generations of a trajectory recorded by ``benchmarks/fidelity.py`` (so run
that first for the task), fills the replay buffer with them, then times the same K steps of
``batch_rows`` rows several times, alternating the arithmetic so that other load on the machine
falls on both alike. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/fidelity.py --tasks sst2 --calls 68 --skip-first 0
    GDFO_DATA_DIR=../shared/data python benchmarks/student_step.py --task sst2 --calls 68
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from gdfo_ray import GDFOConfig
from gdfo_ray.cli import parse_sets
from gdfo_ray.config import apply_overrides
from gdfo_ray.losses import fitness
from gdfo_ray.student import ReplayBuffer, StudentTrainer
from gdfo_ray.tasks import load_task

from fidelity import trajectory_path  # a sibling script: benchmarks/ is on sys.path when this one runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--calls", type=int, default=68, help="which recorded trajectory (fidelity.py --calls)")
    p.add_argument("--cache", default="runs/fidelity_cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[],
                   help="key=value, as gdfo run --set (e.g. student.text_cache=false)")
    args = p.parse_args(argv)
    overrides = {"task.name": args.task, "task.prompt_placement": "suffix", "seed": args.seed, "method": "gdfo",
                 **parse_sets(args.set)}
    config = GDFOConfig.from_dict(apply_overrides(GDFOConfig().to_dict(), overrides))
    path = trajectory_path(config, args.calls, args.cache)
    if not os.path.exists(path):
        p.error(f"no trajectory {path}: run benchmarks/fidelity.py --tasks {args.task} --seeds {args.seed} "
                f"--calls {args.calls} first")
    traj = dict(np.load(path))
    data = load_task(config.task, config.seed)
    trainer = StudentTrainer(config, data)
    buffer, rng = ReplayBuffer(config.student.buffer_candidates), np.random.default_rng(config.seed)
    ids, labels = np.arange(len(data.train)), data.train.label
    for Z, logits in zip(traj["Z"], traj["logits"]):
        buffer.add(Z, logits, ids, fitness(logits, labels, config.search.loss or data.spec.loss))
    cfg = config.student
    batches = [buffer.sample(cfg.batch_rows, rng, labels) for _ in range(cfg.k_steps)]
    trainer.train_steps(batches[:2])  # warm-up: allocator, kernels
    model, predictions_autocast = trainer.model, trainer.model.autocast
    times: dict = {"float32": [], "bfloat16": []}
    try:
        for _ in range(args.repeats):
            for name in times:
                model.autocast = model.autocast_training = name == "bfloat16"
                t0 = time.perf_counter()
                trainer.train_steps(batches)
                times[name].append(time.perf_counter() - t0)
    finally:
        model.autocast, model.autocast_training = predictions_autocast, False
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_steps(batches)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"{args.task}: {cfg.k_steps} steps x {cfg.batch_rows} rows, text_cache={cfg.text_cache}, "
          f"torch threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"  {name:8s} training: {min(t):.2f} to {max(t):.2f} s ({len(t)} runs)")
    print(f"  matrix products: {matmul / total:.0%} of the profiler's self CPU time (float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
