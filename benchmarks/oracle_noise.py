"""How faithful ``oracle:S`` is, for the ladder's rungs between the real students and the exact oracle.

For each noise amplitude S, a short gdfo run with ``--student oracle:S`` (SST-2, seed 21, which
no rung of the ladder reports, 170 calls, the ladder's settings), twice: with the default
update, as a ladder rung runs, and with ``harmonize.gate=off``, where CMA-ES searches alone and
the student is only scored, so that its fidelity is measured on CMA-ES's own populations. The
noise is S times the oracle's spread on each population, so that fidelity would be near
``1/sqrt(1 + S^2)`` if the noise were independent of the fitness; a gradient candidate that
descends both the oracle and the noise makes them agree, so fidelity in the ladder's runs is
higher. The runs land in ``OUT/runs/`` (not committed: they hold this machine's paths), the
table in ``OUT/oracle_noise.md``; a finished run is not run again::

    GDFO_DATA_DIR=/path/to/shared/data python benchmarks/oracle_noise.py benchmarks/results/oracle-noise-2026-12-05
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pandas as pd

SETTINGS = ("task.prompt_placement=suffix", "task.max_test_examples=200", "student.k_steps=0")


def run_one(out: str, noise: str, gate: str, task: str, seed: int, budget: int) -> str:
    folder = os.path.join(out, "runs", f"s{noise}_{gate}")
    if os.path.exists(os.path.join(folder, "summary.json")):
        return folder
    cmd = ["gdfo", "run", "--task", task, "--method", "gdfo", "--student", f"oracle:{noise}", "--budget", str(budget),
           "--seed", str(seed), "--backend", "local", "--output-dir", folder, "--overwrite"]
    for setting in SETTINGS + (f"harmonize.gate={gate}",):
        cmd += ["--set", setting]
    subprocess.run(cmd, check=True)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--noise", nargs="+", default=["1", "2", "4"])
    p.add_argument("--gates", nargs="+", default=["rho", "off"])
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--budget", type=int, default=170)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    lines = [f"# Fidelity of oracle:S ({args.task}, seed {args.seed}, {args.budget} calls; "
             f"table written at commit {commit})", "",
             f"`python benchmarks/oracle_noise.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| S | update | 1/sqrt(1+S²) | median fidelity | fidelity per generation | gradient candidate first |",
             "|---|---|---|---|---|---|"]
    for noise in args.noise:
        for gate in args.gates:
            folder = run_one(args.out, noise, gate, args.task, args.seed, args.budget)
            h = pd.read_parquet(os.path.join(folder, "history.parquet"))
            fid = h["fidelity"].dropna().to_numpy()
            ranks = h["z_gd_rank"].dropna().to_numpy()
            first = f"{int((ranks == 1).sum())} of {len(ranks)}" if len(ranks) else "–"
            lines.append(f"| {noise} | {'default' if gate == 'rho' else 'gate=off (CMA-ES alone)'} "
                         f"| {1 / np.sqrt(1 + float(noise) ** 2):.2f} | {np.median(fid):+.2f} "
                         f"| {' '.join(f'{f:+.2f}' for f in fid)} | {first} |")
    with open(os.path.join(args.out, "oracle_noise.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
