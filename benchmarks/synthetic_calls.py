"""Calls to reach a target loss on the synthetic linear black box: gdfo, its random-direction control, bbt.

The black box of the driver's tests (``tests/synthetic_blackbox.py``), where a linear student
can be exact. ``--student learned`` distils it from the paid answers (K = 30 steps a
generation), ``--student exact`` starts it at the black box's own map and trains nothing, so
the gradient is exact and what is measured is the update alone. Per seed, the train calls at
which the best fitness first fell to ``--target`` (inf: never, within the budget); then the
median per method, and on how many seeds each beat bbt. Example::

    python benchmarks/synthetic_calls.py --student exact --seeds 0-9
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from synthetic_blackbox import calls_to_reach, setup_synthetic  # noqa: E402

RUNS = {"gdfo": ("gdfo", "none"), "gdfo_random": ("gdfo", "random"), "bbt": ("bbt", "none")}


def seed_range(text: str) -> list[int]:
    """``"0-9"`` or ``"3"``: the seeds, inclusive."""
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", choices=("learned", "exact"), default="learned")
    p.add_argument("--seeds", type=seed_range, default=seed_range("0-9"), help="an inclusive range, e.g. 0-29")
    p.add_argument("--methods", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--target", type=float, default=0.1)
    p.add_argument("--budget", type=int, default=320)
    args = p.parse_args(argv)
    exact = args.student == "exact"
    calls = {}
    for label in args.methods:
        method, control = RUNS[label]
        calls[label] = [calls_to_reach(setup_synthetic(method, seed, budget=args.budget, control=control,
                                                       k_steps=0 if exact else 30, exact_student=exact)[0]
                                       .run().history, args.target) for seed in args.seeds]
        print(f"{label:12s} median {np.median(calls[label]):6.1f} | per seed {calls[label]}", flush=True)
    if "bbt" in calls:
        for label in (m for m in calls if m != "bbt"):
            a, b = np.asarray(calls[label]), np.asarray(calls["bbt"])
            print(f"{label} against bbt over {len(a)} seeds: fewer calls on {int((a < b).sum())}, more on "
                  f"{int((a > b).sum())}; median ratio {np.median(a) / np.median(b):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
