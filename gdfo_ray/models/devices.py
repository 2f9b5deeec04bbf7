"""Where and in what arithmetic a model runs: device, threads, bfloat16 where the processor has it."""

from __future__ import annotations

import os

import numpy as np
import torch


def host_tensor(array, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor copied from an array; arrays that come through Ray's object store are read-only, and
    views (``Z[::-1]``) may have negative strides, which torch refuses."""
    return torch.tensor(np.ascontiguousarray(array), dtype=dtype, device=device)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_threads(n: int) -> None:
    """Intra-op threads; 0 means every core, since Ray actors default to one."""
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)  # private in torch 2.x; absent means "don't know"
        if check is not None and check():
            return True
    return False


def resolve_dtype(requested: str, device: torch.device) -> str:
    """``auto``: bfloat16 where the device computes it natively, else float32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_fast_bfloat16() else "float32"
