"""How white_box's exact-gradient descent fits the training examples and what the dev set says meanwhile.

For each white_box cell of a campaign: the train loss at the first and last step (the
curve's ``fitness_best``: the lowest loss so far), the dev accuracy at the first dev
evaluation, at its peak and at the last evaluation (with the step of each), and the test
score of the best-dev prompt. A train loss near zero while dev peaks early and then falls
is overfitting: the ceiling white_box sets is one of gradient information on 32 examples,
not of generalization::

    python benchmarks/white_box_curves.py benchmarks/results/campaign-oracle-2026-12-05
"""

from __future__ import annotations

import argparse
import sys

from gdfo_ray.campaign import read_results


def curves(results_dir: str) -> dict[tuple, list[dict]]:
    """(task, seed) -> that white_box cell's curve rows, in step order."""
    out: dict[tuple, list[dict]] = {}
    for row in read_results(results_dir, "curves"):
        if row["method"] == "white_box":
            out.setdefault((row["task"], int(row["seed"])), []).append(row)
    return {k: sorted(v, key=lambda r: r["calls"]) for k, v in out.items()}


def summary(rows: list[dict]) -> dict:
    """First and last train loss, and the first, peak and last dev evaluation as (step, score)."""
    dev = [(int(r["calls"]), float(r["dev_score"])) for r in rows
           if r.get("dev_score") is not None and r["dev_score"] == r["dev_score"]]  # NaN between evaluations
    peak = max(dev, key=lambda d: d[1]) if dev else None  # the first of equal peaks: max keeps the earliest
    return {"steps": int(rows[-1]["calls"]), "loss_first": float(rows[0]["fitness_best"]),
            "loss_last": float(rows[-1]["fitness_best"]), "evals": len(dev),
            "dev_first": dev[0] if dev else None, "dev_peak": peak, "dev_last": dev[-1] if dev else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_dir")
    args = p.parse_args(argv)
    found = curves(args.results_dir)
    if not found:
        p.error(f"{args.results_dir} has no white_box cell with a curve")
    test = {(r["task"], int(r["seed"])): r["test_score"] for r in read_results(args.results_dir)
            if r["method"] == "white_box"}

    def at(d):
        return "–" if d is None else f"{d[1]:.3f} (step {d[0]})"

    print("| task | seed | steps | train loss first → last | dev evaluations | dev first | dev peak | dev last "
          "| test (best-dev prompt) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, seed), rows in sorted(found.items()):
        s = summary(rows)
        score = test.get((task, seed))
        print(f"| {task} | {seed} | {s['steps']} | {s['loss_first']:.3f} → {s['loss_last']:.3f} | {s['evals']} "
              f"| {at(s['dev_first'])} | {at(s['dev_peak'])} | {at(s['dev_last'])} "
              f"| {'–' if score is None else f'{100 * score:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
