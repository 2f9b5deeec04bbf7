"""A generation's student time beside its teacher time, per student, from a few generations of gdfo.

The students cut from the teacher (``oracle``, ``sibling:K``) backpropagate through its blocks; this
prints, for each student asked for, the mean teacher and student seconds per generation (the first
generation left out: it loads and caches), so that ``student.k_steps`` and ``student.batch_rows`` can
be chosen to keep the student's time near the teacher's. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/student_cost.py --task sst2 \\
        --students oracle sibling:4 sibling:12 sibling:24 gp --generations 4 --set student.k_steps=5
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from gdfo_ray import GDFOConfig
from gdfo_ray.api import run
from gdfo_ray.config import parse_sets
from gdfo_ray.config import apply_overrides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--students", nargs="+", default=["oracle", "sibling:4", "sibling:12", "sibling:24", "gp"])
    p.add_argument("--generations", type=int, default=4, help="generations per student (the first is not counted)")
    p.add_argument("--set", action="append", default=[], help="key=value, as gdfo run --set")
    args = p.parse_args(argv)
    if args.generations < 2:
        p.error("--generations must be at least 2: the first one is not counted")
    print(f"{args.task}, seed {args.seed}, {args.generations} generations, settings {args.set or 'default'}")
    print(f"{'student':12s} {'teacher s/gen':>14s} {'student s/gen':>14s} {'ratio':>6s} {'kd loss':>8s} {'fidelity':>9s}")
    for student in args.students:
        with tempfile.TemporaryDirectory() as out:
            overrides = {"task.name": args.task, "seed": args.seed, "method": "gdfo", "model.student": student,
                         "task.prompt_placement": "suffix", "pool.backend": "local", "output_dir": out,
                         "task.max_test_examples": 1, **parse_sets(args.set)}
            config = GDFOConfig.from_dict(apply_overrides(GDFOConfig().to_dict(), overrides))
            config = config.with_overrides({"search.budget_calls": config.popsize * args.generations})
            rows = run(config, overwrite=True, progress=None).history[1:]
        teacher_s, student_s = np.mean([r["teacher_s"] for r in rows]), np.mean([r["student_s"] for r in rows])
        kd = np.nanmean([r["kd_loss"] for r in rows]) if any(np.isfinite(r["kd_loss"]) for r in rows) else np.nan
        fid = np.nanmedian([r["fidelity"] for r in rows])
        print(f"{student:12s} {teacher_s:14.1f} {student_s:14.1f} {student_s / teacher_s:6.2f} {kd:8.3f} {fid:+9.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
