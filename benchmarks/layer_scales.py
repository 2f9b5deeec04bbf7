"""Scale of the hidden states entering each layer of the teacher: plain std against the robust
std (1.4826 x MAD) that bbtv2 scales its per-layer prompts by. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/layer_scales.py --task sst2
"""

from __future__ import annotations

import argparse
import sys

import torch

from gdfo_ray import GDFOConfig
from gdfo_ray.teachers.local import LocalTeacher
from gdfo_ray.tasks import load_task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--teacher", default=GDFOConfig().model.teacher)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--examples", type=int, default=16)
    args = p.parse_args(argv)
    config = GDFOConfig.from_dict({"task": {"name": args.task}, "model": {"teacher": args.teacher}, "seed": args.seed})
    lm = LocalTeacher(config, load_task(config.task, config.seed)).lm
    robust = lm.layer_input_std("train", args.examples)
    enc = lm.encoded["train"]
    seqs = [enc.before[r] + enc.after[r] for r in range(min(args.examples, len(enc.before)))]
    ids, mask = lm._padded(seqs, max(len(s) for s in seqs))
    with torch.no_grad():
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    print("| layer | plain std | robust std (bbtv2's scale) |\n|---|---|---|")
    for layer, scale in enumerate(robust):
        print(f"| {layer} | {float(hidden[layer][mask.bool()].float().std()):.3f} | {scale:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
