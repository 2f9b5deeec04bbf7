"""Compare manual, bbt, kd, gdfo (and gdfo's random-direction control) at one budget.

Prints, per task and method, the test score (mean and spread over seeds), the
calls gdfo needed to reach bbt's final dev score, and the wall time per API call.
Each finished run is appended to ``<out>/runs.jsonl``; a rerun skips finished runs,
so an interrupted comparison resumes. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/compare_methods.py --budget 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from gdfo_ray import GDFOConfig
from gdfo_ray.api import run

METHODS = ("manual", "bbt", "kd", "gdfo", "gdfo_random")


def config_for(task: str, seed: int, method: str, args: argparse.Namespace) -> GDFOConfig:
    import yaml

    base = method.replace("_random", "")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return GDFOConfig.from_dict({
        "method": base, "seed": seed,
        "output_dir": os.path.join(args.out, f"{task}_{method}_seed{seed}"),
        "task": {"name": task, "max_test_examples": args.max_test, "max_text_tokens": args.max_text_tokens},
        "search": {"budget_calls": args.budget, "popsize": args.popsize, "eval_every_calls": args.popsize},
        "student": {"k_steps": args.k_steps},
        "harmonize": {"control": "random" if method.endswith("_random") else "none"},
        "pool": {"backend": args.backend},
    }).with_overrides(overrides)


def calls_to_reach(history: list, target: float) -> float:
    for row in history:
        if row.get("dev_score") is not None and row["dev_score"] >= target:
            return row["calls"]
    return float("nan")


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
    p.add_argument("--backend", default="local", choices=("local", "ray"))
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, e.g. --set model.dtype=bfloat16 (repeatable)")
    p.add_argument("--label", default="", help="a name for the settings, printed above the table")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "runs.jsonl")
    done = {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                rec = json.loads(line)
                done[(rec["task"], rec["seed"], rec["method"])] = rec
    for seed in args.seeds:  # seed-major: a cut-short comparison still covers every method
        for task in args.tasks:
            for method in args.methods:
                if (task, seed, method) in done:
                    continue
                t0 = time.time()
                result = run(config_for(task, seed, method, args), overwrite=True,
                             progress=lambda line: print(f"  [{task} {method} {seed}] {line}", file=sys.stderr))
                rec = {"task": task, "seed": seed, "method": method, "test": result.summary["test"],
                       "dev_best": result.summary["dev_best"], "calls": result.summary["calls"],
                       "s_per_call": result.summary["s_per_call"], "wall_s": time.time() - t0,
                       "mean_rho": result.summary["mean_rho"], "median_fidelity": result.summary["median_fidelity"],
                       "dev_curve": [(r["calls"], r.get("dev_score")) for r in result.history]}
                done[(task, seed, method)] = rec
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    print(report(done, args))
    return 0


def report(done: dict, args: argparse.Namespace) -> str:
    lines = [f"{args.label + ': ' if args.label else ''}budget {args.budget} calls, popsize {args.popsize}, "
             f"K {args.k_steps}, test subsample {args.max_test}, teacher SmolLM2-135M-Instruct, student "
             f"all-MiniLM-L6-v2, overrides {args.set or 'none'}", "",
             "| task | method | seeds | test (mean ± std) | dev best | calls to bbt's dev | s/call | rho | fidelity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        for method in args.methods:
            recs = [done[(task, s, method)] for s in args.seeds if (task, s, method) in done]
            if not recs:
                continue
            scores = [r["test"]["teacher_tuned"] for r in recs]
            reach = []
            if method.startswith("gdfo"):
                for r in recs:
                    bbt = done.get((task, r["seed"], "bbt"))
                    if bbt and bbt["dev_best"] is not None:
                        reach.append(calls_to_reach([{"calls": c, "dev_score": d} for c, d in r["dev_curve"]],
                                                    bbt["dev_best"]))
            per_call = [r["s_per_call"] for r in recs if r["s_per_call"]]
            fmt = lambda xs: f"{np.nanmean(xs):.3f}" if xs and not all(x is None for x in xs) else "-"
            rho = [r["mean_rho"] for r in recs if r["mean_rho"] is not None]
            fid = [r["median_fidelity"] for r in recs if r["median_fidelity"] is not None]
            lines.append(
                f"| {task} | {method} | {len(recs)} | {np.mean(scores):.3f} ± {np.std(scores):.3f} | "
                f"{fmt([r['dev_best'] for r in recs if r['dev_best'] is not None])} | "
                f"{', '.join('never' if np.isnan(x) else str(int(x)) for x in reach) or '-'} | "
                f"{fmt(per_call)} | {fmt(rho)} | {fmt(fid)} |")
        student = [done[(task, s, "gdfo")]["test"].get("student") for s in args.seeds if (task, s, "gdfo") in done]
        if student:
            lines.append(f"| {task} | gdfo's student | {len(student)} | {np.mean(student):.3f} ± {np.std(student):.3f} "
                         "| - | - | - | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
