"""The update's choice on tuning seeds: each variant of benchmarks/update_variants.sh against today's update.

For every student and variant campaign under ROOT (``<student>-<variant>``), it pairs each cell's
best dev score with the ``today`` cell of the same student, task and seed, and prints the mean
paired difference (over the pairs both have), per task and over all, with wins and losses. The
rule, written down before the cells came in: a variant beats today's update when its mean paired
dev difference over the three tasks and two seeds is above zero and it wins more pairs than it
loses; the best such variant with ``gp`` becomes the default. The test set is never read.
Example::

    python benchmarks/update_choice.py benchmarks/results/update-variants
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np


def dev_scores(path: str) -> dict:
    """``{(task, seed): best dev score}`` of a variant campaign's finished gdfo cells."""
    from gdfo_ray.campaign import read_results

    return {(r["task"], int(r["seed"])): float(r["dev_best"]) for r in read_results(path)
            if r["method"] == "gdfo" and r.get("dev_best") is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="benchmarks/results/update-variants")
    args = p.parse_args(argv)
    campaigns = collections.defaultdict(dict)  # student -> variant -> scores
    for name in sorted(os.listdir(args.root)):
        student, _, variant = name.partition("-")
        if variant and os.path.isdir(os.path.join(args.root, name, "cells")):
            campaigns[student][variant] = dev_scores(os.path.join(args.root, name))
    for student, variants in campaigns.items():
        today = variants.get("today", {})
        print(f"\n## {student}: best dev score, variant − today, paired by task and seed\n")
        print("| variant | pairs | mean difference | by task | wins / losses | beats today |")
        print("|---|---|---|---|---|---|")
        for variant, scores in variants.items():
            if variant == "today":
                continue
            pairs = sorted(set(scores) & set(today))
            if not pairs:
                print(f"| {variant} | 0 | – | – | – | no pairs yet |")
                continue
            diffs = np.asarray([scores[k] - today[k] for k in pairs])
            by_task = collections.defaultdict(list)
            for (task, _), d in zip(pairs, diffs):
                by_task[task].append(d)
            tasks = ", ".join(f"{t} {100 * np.mean(v):+.2f}" for t, v in sorted(by_task.items()))
            wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
            beats = diffs.mean() > 0 and wins > losses
            print(f"| {variant} | {len(pairs)} | {100 * diffs.mean():+.2f} | {tasks} | {wins} / {losses} | "
                  f"{'yes' if beats else 'no'} |")
        print(f"\ntoday's cells: {len(today)} (task x seed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
