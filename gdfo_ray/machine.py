"""The machine a result came from: processor, cores, instruction sets, GPU, and its measured matmul rate.

Every run records this beside its versions, so that a time (a teacher's seconds per
call) can be read against what the machine could do: the *floor* of a call is its
floating-point work over the matmul rate measured here, in the run's dtype. Needs torch,
imported when measured; no Ray.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Optional

# The instruction sets that decide how fast a CPU runs a transformer in bfloat16 (flag names of /proc/cpuinfo).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> dict:
    info: dict = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "flags") and key.strip() not in info:
                    info[key.strip()] = value.strip()
    return info


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def cpu_features() -> dict:
    """Which of :data:`CPU_FEATURES` this processor has (all False where /proc/cpuinfo is not readable)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {name: name in flags for name in CPU_FEATURES}


def cores_available() -> int:
    """Cores this process may run on (its affinity; a container's or ``taskset``'s share, not the host's)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def matmul_rate(dtype: str = "float32", device: str = "cpu", seconds: float = 0.3) -> float:
    """FLOP/s of the matrix products a small transformer is made of, at this process's thread count.

    Products of (m x 576) by (576 x 1536), SmolLM2's widths, with m grown from 64 up to 1024 while
    a product stays short, repeated for about ``seconds``: a second or less even where the dtype
    is emulated and slow. The rate is the median product's: on a shared machine the mean
    follows a neighbour's burst (on a 2-core VM it went from 88 to 149 GFLOP/s between two
    runs) and the fastest product an idle moment (181, near the cores' peak).
    """
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    k, n = 576, 1536
    b = torch.randn(k, n, dtype=torch_dtype, device=device)

    def timed(a) -> float:
        started = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    m = 64
    a = torch.randn(m, k, dtype=torch_dtype, device=device)
    timed(a)  # warm-up
    while m < 1024 and timed(a) < seconds / 20:
        m *= 2
        a = torch.randn(m, k, dtype=torch_dtype, device=device)
    times: list = []
    while sum(times) < seconds:
        times.append(timed(a))
    return 2.0 * m * k * n / statistics.median(times)


def gpu_name() -> Optional[str]:
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return None


def describe_machine(dtype: str = "float32", device: str = "cpu") -> dict:
    """What a result's times depend on, with the matmul rate measured now in ``dtype`` on ``device``."""
    import torch

    return {"cpu": cpu_name(), "cores": cores_available(), "torch_threads": torch.get_num_threads(),
            "cpu_features": cpu_features(), "gpu": gpu_name(), "matmul_device": device, "matmul_dtype": dtype,
            "matmul_gflops": round(matmul_rate(dtype, device) / 1e9, 1)}
