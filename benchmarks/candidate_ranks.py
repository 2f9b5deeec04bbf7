"""How gdfo's gradient candidates fare in their populations, and how often the rho gate lets the mean move.

For each gdfo cell of a campaign: the share of generations in which the best injected
gradient candidate ranked first among the population the teacher scored (its rank counts
the CMA-ES samples with a lower fitness, plus one), the median rank, the mean rho and the
share of generations with rho > 0 (the only ones in which the default update moves the
mean toward the gradient). A gradient that often wins its population while rho stays
negative is one the update leaves unused: the case for ``harmonize.mean_to_best`` and
``gate=none`` (issue 21, step 3).

It reads each cell's per-generation history: the campaign's ``curves/`` where they hold
``rho`` and ``z_gd_rank`` (cells from 2026-12-05 on), else the cell's run folder
(``runs/<cell>/history.parquet``, left by ``gdfo bench`` on the machine that ran it)::

    python benchmarks/candidate_ranks.py benchmarks/results/campaign-oracle-2026-12-05
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from gdfo_ray.campaign import read_results


def histories(results_dir: str) -> dict[tuple, list[dict]]:
    """(task, label, seed) -> that gdfo cell's rows, each with ``rho`` and ``z_gd_rank``."""
    out: dict[tuple, list[dict]] = {}
    for row in read_results(results_dir, "curves"):
        if row.get("z_gd_rank") is not None or row.get("rho") is not None:
            out.setdefault((row["task"], row["method"], int(row["seed"])), []).append(row)
    for row in read_results(results_dir, "cells"):
        key = (row["task"], row["method"], int(row["seed"]))
        if not row["method"].startswith("gdfo") or key in out:
            continue
        path = os.path.join(results_dir, "runs", f"{key[0]}_{key[1]}_seed{key[2]}", "history.parquet")
        if os.path.exists(path):
            import pyarrow.parquet as pq

            out[key] = pq.read_table(path).to_pylist()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_dir")
    args = p.parse_args(argv)
    found = histories(args.results_dir)
    if not found:
        p.error(f"{args.results_dir} has no gdfo cell with a per-generation history (curves or runs/)")
    print("| task | run | seed | generations | gradient candidate first | median rank | mean rho | rho > 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for (task, label, seed), rows in sorted(found.items()):
        ranks = np.asarray([r["z_gd_rank"] for r in rows if r.get("z_gd_rank") is not None], float)
        rho = np.asarray([r["rho"] for r in rows if r.get("rho") is not None], float)
        if not len(ranks):
            continue
        print(f"| {task} | {label} | {seed} | {len(ranks)} | {np.mean(ranks == 1):.0%} | {np.median(ranks):.0f} "
              f"| {np.mean(rho):+.2f} | {np.mean(rho > 0):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
