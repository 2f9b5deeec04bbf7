"""Does a result depend on how the work is laid out? The manual prompt's SST-2 test answers, per layout.

Each layout scores the default teacher with the manual prompt on the whole SST-2 test set
(872 rows, packaged with gdfo-ray) in one dtype. It prints each layout's accuracy and how many
rows' answers differ from the first layout's: how the forwards are cut (rows and tokens per
forward, the prompt's shared states) and how many teacher actors share the rows change the
rounding of every logit, and a row near a tie may then change its answer. Example::

    python benchmarks/layouts.py --dtype float32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

LAYOUTS = {
    # name: overrides of the default config
    "default (1 actor, 64 rows, 2048 tokens, shared prompt states)": {},
    "per-row forwards (model.kv_cache=false)": {"model.kv_cache": False},
    "16 rows per forward, no token budget": {"model.max_rows_per_forward": 16, "model.max_tokens_per_forward": None},
    "2 teacher actors of 1 CPU": {"pool.n_teacher_actors": 2, "pool.teacher_num_cpus": 1.0,
                                  "pool.torch_threads": 1},
}


def answers(overrides: dict, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The manual prompt's answer on every test row, and the labels."""
    from gdfo_ray.api import run
    from gdfo_ray.config import GDFOConfig, build_config_dict

    with tempfile.TemporaryDirectory() as out:
        config = GDFOConfig.from_dict(build_config_dict(overrides={
            "method": "manual", "output_dir": out, "model.dtype": dtype, "task.data_dir": None, **overrides}))
        run(config, progress=None)
        saved = np.load(os.path.join(out, "test_predictions.npz"))
        return saved["manual"], saved["label"]


def main(argv=None) -> int:
    from gdfo_ray.machine import cores_available, cpu_name

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    args = p.parse_args(argv)
    print(f"# {cpu_name()}, {cores_available()} cores; SST-2 test (872 rows), manual prompt, dtype {args.dtype}\n")
    print("| layout | test accuracy | rows answered unlike the first layout |")
    print("|---|---|---|")
    first = None
    for name, overrides in LAYOUTS.items():
        pred, label = answers(overrides, args.dtype)
        first = pred if first is None else first
        print(f"| {name} | {float((pred == label).mean()):.4f} | {int((pred != first).sum())} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
