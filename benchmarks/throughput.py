"""Where a black-box call's time goes, against the floor set by the machine's arithmetic.

For the default teacher on one population x the SST-2 training batch (lambda
prompts x 32 examples), it prints:

(a) the floor: the floating-point work of a call (the transformer over every
    example's real tokens, no padding, one readout; a prompt's states once per prompt
    where its rows share them) over this machine's measured matrix-multiply rate in
    the same dtype;
(b) the plain Hugging Face forward of the same population x batch: prompt embeddings
    injected, padded to the longest row, the full vocabulary head at every position
    (in chunks of 64 rows);
(c) a gdfo-ray call through the teacher pool, for each variant asked for;
(d) whole generations of a default GDFO run, split into teacher, student,
    optimizer and orchestration time.

Every time is per call (a population's time over lambda). Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/throughput.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from gdfo_ray.machine import cores_available, cpu_name, matmul_rate

VARIANTS = {
    # name: (dtype, prompt placement, kv cache, torch.compile)
    "fp32": ("float32", "prefix", True, False),
    "bf16": ("bfloat16", "prefix", True, False),
    "fp32-suffix-nocache": ("float32", "suffix", False, False),
    "fp32-suffix-kv": ("float32", "suffix", True, False),
    "bf16-suffix-kv": ("bfloat16", "suffix", True, False),
    "fp32-compile": ("float32", "prefix", True, True),
}


def build(args, variant: str):
    from gdfo_ray.config import GDFOConfig
    from gdfo_ray.teachers.local import LocalTeacher
    from gdfo_ray.tasks import load_task

    dtype, placement, kv, compiled = VARIANTS[variant]
    config = GDFOConfig.from_dict({
        "task": {"name": args.task, "prompt_placement": placement},
        "model": {"teacher": args.teacher, "dtype": dtype, "kv_cache": kv, "compile": compiled,
                  **({"max_rows_per_forward": args.rows_per_forward} if args.rows_per_forward else {}),
                  **({"max_tokens_per_forward": args.tokens_per_forward or None}
                     if args.tokens_per_forward is not None else {})},
        "prompt": {"n_prompt_tokens": args.prompt_tokens},
        "pool": {"backend": "local"},
    })
    data = load_task(config.task, config.seed)
    return config, data, LocalTeacher(config, data)


def population(args, hidden: int, std: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(args.popsize, args.prompt_tokens, hidden)) * std).astype(np.float32)


def time_pool_call(teacher, prompts: np.ndarray, ids: np.ndarray, repeats: int) -> float:
    from gdfo_ray.teachers import TeacherPool

    pool = TeacherPool([teacher])
    pool.query(prompts, "train", ids)  # warm-up (and the prefix cache, built once per run)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pool.query(prompts, "train", ids)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(prompts)


def time_plain_hf(teacher, prompts: np.ndarray, ids: np.ndarray, rows_per_forward: int = 64) -> float:
    """What a user without gdfo-ray would run: full LM forward, padded to the longest row."""
    lm = teacher.lm
    enc = lm.encoded["train"]
    n = prompts.shape[1]
    rows = [(c, i) for c in range(len(prompts)) for i in ids]
    width = max(len(enc.before[i]) + n + len(enc.after[i]) for _, i in rows)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(rows), rows_per_forward):
            chunk = rows[start:start + rows_per_forward]
            ids_t = torch.full((len(chunk), width), lm.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            embeds = []
            for j, (c, i) in enumerate(chunk):
                seq = enc.before[i] + [lm.pad_id] * n + enc.after[i]
                ids_t[j, : len(seq)] = torch.as_tensor(seq)
                mask[j, : len(seq)] = 1
            embeds = lm.embeddings(ids_t)
            for j, (c, i) in enumerate(chunk):
                b = len(enc.before[i])
                embeds[j, b:b + n] = torch.as_tensor(prompts[c], dtype=embeds.dtype)
            logits = lm.model(inputs_embeds=embeds, attention_mask=mask).logits  # (rows, width, vocab)
            slots = [len(enc.before[i]) + n + enc.slot[i] for _, i in chunk]
            logits[torch.arange(len(chunk)), torch.as_tensor(slots)][:, lm.verbalizer_ids]
    return (time.perf_counter() - t0) / len(prompts)


def generation_split(args) -> dict:
    """Mean per-generation seconds of a default GDFO run (local backend), by part."""
    import tempfile

    from gdfo_ray.api import run
    from gdfo_ray.config import GDFOConfig

    with tempfile.TemporaryDirectory() as out:
        config = GDFOConfig.from_dict({
            "output_dir": out, "task": {"name": args.task, "max_test_examples": 8,
                                        "prompt_placement": args.generation_placement},
            "model": {"teacher": args.teacher, "dtype": args.generation_dtype},
            "search": {"budget_calls": args.generations * 17, "eval_every_calls": 10**6},
            "pool": {"backend": args.generation_backend},
        })
        result = run(config, progress=None)
    rows = result.history[1:] or result.history  # the first generation also builds caches
    keys = ("teacher_s", "student_s", "optimizer_s", "eval_s", "other_s", "step_s")
    split = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    floor = result.summary.get("floor_s_per_call") or float("nan")
    return {**split, "s_per_call_over_floor": split["teacher_s"] / args.popsize / floor}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--task", default="sst2")
    p.add_argument("--popsize", type=int, default=17, help="lambda (the default for d=100)")
    p.add_argument("--prompt-tokens", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=[v for v in VARIANTS if v != "fp32-compile"],
                   choices=list(VARIANTS), help="fp32-compile is left out by default: its first call compiles "
                   "for about 2 minutes on 2 cores")
    p.add_argument("--rows-per-forward", type=int, default=None, help="model.max_rows_per_forward (default: config's)")
    p.add_argument("--tokens-per-forward", type=int, default=None,
                   help="model.max_tokens_per_forward (0: no limit; default: config's)")
    p.add_argument("--generations", type=int, default=3, help="for (d); 0 skips it")
    p.add_argument("--generation-dtype", default="float32")
    p.add_argument("--generation-placement", default="prefix")
    p.add_argument("--generation-backend", default="ray", choices=("ray", "local"),
                   help="ray: actors, as `make run` (the default); local: everything in this process")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    print(f"# {cpu_name()}, {cores_available()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    # The rate runs record (gdfo_ray/machine.py), measured for longer here: the floor a run's ratio is read against.
    rates = {"float32": matmul_rate("float32", seconds=2.0), "bfloat16": matmul_rate("bfloat16", seconds=2.0)}
    print(f"# matmul rate: float32 {rates['float32'] / 1e9:.0f} GFLOP/s, bfloat16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s")
    rows = []
    plain = None
    for variant in args.variants:
        config, data, teacher = build(args, variant)
        ids = np.arange(len(data.train))
        prompts = population(args, teacher.lm.hidden_size, teacher.lm.embedding_std())
        dtype = VARIANTS[variant][0]
        t_build = time.perf_counter()
        teacher.query(prompts[:1], "train", ids)  # builds the prefix cache where there is one
        first = time.perf_counter() - t_build
        flops = teacher.flops_per_call("train", ids)  # one prompt of the call's length, one row at a time
        floor = flops / rates[dtype]
        call = time_pool_call(teacher, prompts, ids, args.repeats)
        if plain is None:
            plain = time_plain_hf(teacher, prompts, ids)
            print(f"# (b) plain HF forward ({dtype}, prefix placement): {plain:.3f} s per call", flush=True)
        rows.append((variant, flops, floor, call, first))
        print(f"# {variant}: {flops / 1e9:.1f} GFLOP per call, floor {floor:.3f} s, call {call:.3f} s "
              f"(first call {first:.2f} s)", flush=True)
        del teacher

    if rows:
        print(f"\n{args.popsize} prompts x {len(ids)} SST-2 examples, {args.prompt_tokens} prompt tokens; "
              "seconds per call (a population's time / lambda)\n")
        print("| variant | work per call (GFLOP) | (a) floor | (b) plain HF | (c) gdfo-ray call | (c)/(a) | (b)/(c) |")
        print("|---|---|---|---|---|---|---|")
        for variant, flops, floor, call, _ in rows:
            print(f"| {variant} | {flops / 1e9:.1f} | {floor:.3f} | {plain:.3f} | {call:.3f} | {call / floor:.2f} | "
                  f"{plain / call:.2f} |")
    if args.generations:
        split = generation_split(args)
        step = split["step_s"]
        print(f"\n(d) one generation of gdfo ({args.generation_dtype}, {args.generation_placement} placement, "
              f"{args.generation_backend} backend, lambda {args.popsize}), mean of generations 2..{args.generations}; "
              f"teacher {split['teacher_s'] / args.popsize:.3f} s per call, {split['s_per_call_over_floor']:.2f}x "
              f"the floor the run measured:\n")
        print("| part | seconds | share |")
        print("|---|---|---|")
        for key, label in (("teacher_s", "teacher"), ("student_s", "student"), ("optimizer_s", "optimizer"),
                           ("eval_s", "dev evaluation"), ("other_s", "orchestration"), ("step_s", "whole")):
            print(f"| {label} | {split[key]:.3f} | {split[key] / step:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
