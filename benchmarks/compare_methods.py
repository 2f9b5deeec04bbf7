"""Compare manual, bbt, kd, gdfo (and gdfo's random-direction control) at one budget.

A small campaign (``gdfo bench`` underneath: a Parquet dataset, finished cells
skipped on rerun) with the comparison's own settings, then two tables: the
report's test scores (mean ± std over seeds), and gdfo's diagnostics per task:
the calls gdfo needed to reach bbt's final dev score, rho, the student's
fidelity and test score, and the wall time per API call. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/compare_methods.py --budget 40
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

from gdfo_ray.campaign import CampaignConfig, read_results, run_campaign
from gdfo_ray.config import parse_sets
from gdfo_ray.config import GDFOConfig, apply_overrides, deep_merge
from gdfo_ray.report import score_table

METHODS = ("manual", "bbt", "kd", "gdfo", "gdfo_random")


def calls_to_reach(curve: list, target: float) -> float:
    for row in sorted(curve, key=lambda r: r["calls"]):
        if row.get("dev_score") is not None and row["dev_score"] >= target:
            return row["calls"]
    return float("nan")


def diagnostics(cells: list, curves: list) -> str:
    """gdfo's own numbers, per task and method: what the score table does not show."""
    curve = defaultdict(list)
    for c in curves:
        curve[(c["task"], c["method"], c["seed"])].append(c)
    bbt_dev = {(r["task"], r["seed"]): r["dev_best"] for r in cells if r["method"] == "bbt"}
    lines = ["| task | method | calls to bbt's dev | rho | fidelity | student test | s/call |", "|---|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in cells:
        if r["method"] != "manual":
            groups[(r["task"], r["method"])].append(r)
    for (task, method), rows in sorted(groups.items()):
        summaries = [json.loads(r["summary_json"]) for r in rows]
        reach = [calls_to_reach(curve[(task, method, r["seed"])], bbt_dev[(task, r["seed"])])
                 for r in rows if bbt_dev.get((task, r["seed"])) is not None] if method.startswith(("gdfo", "kd")) else []

        def mean(key):
            values = [s[key] for s in summaries if s.get(key) is not None]
            return f"{np.mean(values):.3f}" if values else "-"

        student = [s["test"]["student"] for s in summaries if "student" in s["test"]]
        lines.append(f"| {task} | {method} | {', '.join('never' if np.isnan(x) else str(int(x)) for x in reach) or '-'} "
                     f"| {mean('mean_rho')} | {mean('median_fidelity')} | "
                     f"{f'{np.mean(student):.3f}' if student else '-'} | {mean('s_per_call')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=int, default=40, help="calls per run, the same for every method")
    p.add_argument("--popsize", type=int, default=8)
    p.add_argument("--k-steps", type=int, default=10)
    p.add_argument("--max-test", type=int, default=200, help="seeded test subsample per task")
    p.add_argument("--max-text-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/compare_methods", help="the campaign directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, e.g. --set model.dtype=bfloat16 (repeatable)")
    p.add_argument("--label", default="", help="a name for the settings, printed above the tables")
    args = p.parse_args(argv)
    base = apply_overrides(deep_merge(GDFOConfig().to_dict(), {}), {
        "task.max_test_examples": args.max_test, "task.max_text_tokens": args.max_text_tokens,
        "search.popsize": args.popsize, "search.eval_every_calls": args.popsize, "student.k_steps": args.k_steps,
        **parse_sets(args.set)})
    campaign = CampaignConfig(args.out, tuple(args.tasks), tuple(args.seeds), tuple(args.methods), budget=args.budget,
                              base=base)
    outcome = run_campaign(campaign, say=lambda line: print(line, file=sys.stderr, flush=True))
    cells = [r for r in read_results(args.out) if r["task"] in args.tasks and r["method"] in args.methods]
    print(f"{args.label + ': ' if args.label else ''}budget {args.budget} calls, popsize {args.popsize}, "
          f"K {args.k_steps}, test subsample {args.max_test}, overrides {args.set or 'none'}\n")
    print(score_table(cells) + "\n")
    print(diagnostics(cells, read_results(args.out, "curves")))
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
