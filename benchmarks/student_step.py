"""Where a student step's time goes: K distillation steps timed in float32 and in bfloat16, and the
share of the torch profiler's self time spent in matrix products.

It fills a replay buffer with the teacher's answers along the trajectory ``benchmarks/fidelity.py``
records (recording it first when the cache lacks it), by a gdfo run with the gate off that plays the
recording back; then it times the same K steps of ``batch_rows`` rows several times, alternating the
arithmetic so that other load on the machine falls on both alike. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/student_step.py --task sst2 --calls 68
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from gdfo_ray.api import open_run
from gdfo_ray.config import parse_sets
from gdfo_ray.student import make_student
from gdfo_ray.tasks import load_task

from fidelity import record, recording_config  # a sibling script: benchmarks/ is on sys.path when this one runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--calls", type=int, default=68, help="teacher calls of the recorded trajectory")
    p.add_argument("--cache", default="runs/fidelity_cache", help="fidelity.py's cache of recordings")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[],
                   help="key=value, as gdfo run --set (e.g. student.text_cache=false)")
    args = p.parse_args(argv)
    recorded = recording_config(args.task, args.seed, args.calls, parse_sets(args.set), args.cache)
    record(recorded)
    config = recorded.with_overrides({"method": "gdfo", "harmonize.gate": "off", "model.record_answers": None,
                                      "model.teacher": recorded.model.record_answers,
                                      "output_dir": recorded.output_dir + "_student_step"})
    data = load_task(config.task, config.seed)
    with open_run(config.with_overrides({"student.k_steps": 0}), data) as driver:  # only fills the buffer
        driver.run()
        buffer = driver.state.buffer
    trainer = make_student(config, data)
    rng, labels = np.random.default_rng(config.seed), data.train.label
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
