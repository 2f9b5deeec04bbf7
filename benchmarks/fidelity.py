"""Student fidelity and student cost, per task and per student setting, on one recorded teacher trajectory.

Fidelity is what gdfo's gradient rests on: the Spearman correlation between the
fitness the student predicts for a population and the fitness the teacher then
returns, measured before the student has seen that population (as in a run).

Both steps are ordinary runs of the library (``gdfo_ray.api.run``), so they spend,
check and sample exactly as a campaign's cells do:

1. **Record** once per task and seed: bbt (CMA-ES alone) for ``--calls`` calls against
   the teacher, with ``model.record_answers`` keeping every answer (cached in ``--cache``).
2. **Replay** per student setting: gdfo with ``harmonize.gate=off`` and ``model.teacher``
   set to the recording. The gate off keeps CMA-ES's search bbt's, so every prompt has a
   recorded answer; the student is scored on each population before it is distilled on
   it, takes its K steps, and gives its gradient, as in a gdfo run. No teacher call is made.

It prints the median fidelity per task and setting, and a generation's student time
beside the teacher's time for the same generation. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/fidelity.py --tasks sst2 ag_news rte \\
        --variant default --variant gp=model.student=gp --variant rank=student.rank_weight=1

The studies of 2026-12-04 (``benchmarks/results/fidelity-*``) ran an earlier version of this
script, with its own search loop, surrogate fits, a teacher retest, a warm start and an
aligned projection; their READMEs name its commit. The GP surrogate became the ``gp``
student; the warm start and the aligned projection did not help there and were dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import numpy as np

from gdfo_ray import GDFOConfig
from gdfo_ray.api import run
from gdfo_ray.config import apply_overrides


def parse_variant(text: str) -> tuple[str, dict]:
    """``name=key=value,key=value`` (or just ``name``) -> (name, overrides)."""
    name, _, rest = text.partition("=")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def recording_config(task: str, seed: int, calls: int, common: dict, cache: str) -> GDFOConfig:
    """bbt's run that records the teacher's answers; its file is named by everything that shapes the search."""
    base = apply_overrides(GDFOConfig().to_dict(), {
        "task.name": task, "task.prompt_placement": "suffix", "seed": seed, "method": "bbt",
        "search.budget_calls": calls, **common})
    config = GDFOConfig.from_dict(base)
    key = zlib.crc32(json.dumps([config.model.teacher, config.model.dtype, str(config.task), str(config.search),
                                 str(config.prompt)]).encode())
    name = f"{task}_{seed}_{calls}_{key:08x}"
    return config.with_overrides({"model.record_answers": os.path.join(cache, name + ".npz"),
                                  "output_dir": os.path.join(cache, "runs", name)})


def record(config: GDFOConfig) -> list[dict]:
    """The recording run's history (run once; a crashed recording resumes, keeping what it paid for)."""
    out = config.output_dir
    if os.path.exists(os.path.join(out, "summary.json")) and os.path.exists(config.model.record_answers):
        import pyarrow.parquet as pq

        return pq.read_table(os.path.join(out, "history.parquet")).to_pylist()
    print(f"[fidelity] recording {config.search.budget_calls} calls of {config.task.name} seed {config.seed} "
          f"-> {config.model.record_answers}", file=sys.stderr, flush=True)
    return run(config, resume=os.path.exists(os.path.join(out, "config.yaml")), progress=None).history


def replay(recorded: GDFOConfig, overrides: dict, name: str) -> list[dict]:
    """gdfo with the gate off on the recording: the student's history along bbt's recorded search."""
    config = GDFOConfig.from_dict(apply_overrides(recorded.to_dict(), {
        "method": "gdfo", "harmonize.gate": "off", "model.teacher": recorded.model.record_answers,
        "model.record_answers": None, "output_dir": f"{recorded.output_dir}_replay_{name}", **overrides}))
    return run(config, overwrite=True, progress=None).history


def summarize(fid: np.ndarray) -> str:
    fid = fid[np.isfinite(fid)]
    if not len(fid):
        return "– | –"
    return f"{np.median(fid):+.3f} | {np.mean(fid > 0):.0%}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news", "rte"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--calls", type=int, default=255, help="teacher calls recorded per task and seed")
    p.add_argument("--variant", action="append", default=None,
                   help="name=key=value,key=value: the student settings of one replay (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value applied to every run")
    p.add_argument("--cache", default="runs/fidelity_cache", help="where recordings and runs are kept")
    p.add_argument("--skip-first", type=int, default=2,
                   help="generations left out of the median (the untrained student's first guesses)")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    common = dict(parse_variant("x=" + ",".join(args.set))[1]) if args.set else {}
    for name, overrides in variants:  # a bad setting fails here, before a recording takes minutes
        GDFOConfig.from_dict(apply_overrides(GDFOConfig().to_dict(), {**common, "method": "gdfo", **overrides}))
    print("| task | seed | setting | median fidelity | fidelity > 0 | teacher s/gen | student s/gen |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for seed in args.seeds:
            recorded = recording_config(task, seed, args.calls, common, args.cache)
            teacher_s = float(np.median([r["teacher_s"] for r in record(recorded)]))
            for name, overrides in variants:
                rows = replay(recorded, overrides, name)[args.skip_first:]
                fid = np.asarray([np.nan if r.get("fidelity") is None else r["fidelity"] for r in rows], float)
                student_s = float(np.median([r["student_s"] for r in rows])) if rows else float("nan")
                print(f"| {task} | {seed} | {name} | {summarize(fid)} | {teacher_s:.2f} | {student_s:.2f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
