"""``train.dtype: auto`` on CPU: bf16 autocast only where the CPU multiplies bf16 natively.

Detection has two parts. The CPU flags in /proc/cpuinfo say whether the units exist
(``amx_bf16``: Intel AMX tiles; ``avx512_bf16``: AVX512 dot products); without either, bf16
matrix products are emulated and several times slower than fp32, so fp32 is chosen without
further work. With a flag, a short timed probe (~0.1 s) confirms that bf16 is really faster
here, at the model's own width: a (tokens, d) @ (d, 4d) product as autocast runs it (both
operands cast to bf16 every call) against the fp32 product (a hypervisor can hide the units,
and at small widths the casts can cost more than the product saves); bf16 is picked when it
takes at most ``PROBE_RATIO`` of the fp32 time. The SSM kernels compute in fp32 under
autocast either way (seqlm.ops.no_autocast and the kernels' own fp32 accumulation).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
PROBE_RATIO = 0.8  # bf16 must take at most this fraction of the fp32 time


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16 matrix flags this CPU reports (empty when unknown, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    words = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            words.update(line.split(":", 1)[-1].split())
            break
    return [f for f in BF16_FLAGS if f in words]


def _time_matmul(dtype: torch.dtype, n: int, d: int, reps: int = 3) -> float:
    a, w = torch.randn(n, d), torch.randn(d, 4 * d)

    def run():
        return a.to(dtype) @ w.to(dtype)  # autocast casts both operands (fp32 params) each call

    run()  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(2):
            run()
        best = min(best, time.perf_counter() - t)
    return best


def probe_bf16_speedup(d_model: int = 512, tokens: int = 1024) -> float:
    """fp32 time / bf16 time of a (tokens, d) @ (d, 4d) product with autocast's casts
    (> 1: bf16 is faster). Sizes are capped so the probe stays ~0.1 s."""
    n, d = max(16, min(tokens, 512)), max(16, min(d_model, 1024))
    return _time_matmul(torch.float32, n, d) / max(_time_matmul(torch.bfloat16, n, d), 1e-12)


def choose_cpu_dtype(d_model: int = 512, tokens: int = 1024, flags: Optional[list[str]] = None,
                     probe=probe_bf16_speedup) -> tuple[Optional[torch.dtype], str]:
    """(torch.bfloat16 or None for fp32, the reason in words) for ``dtype: auto`` on CPU."""
    flags = cpu_bf16_flags() if flags is None else flags
    if not flags:
        return None, "fp32: the CPU reports no native bf16 matrix unit (amx_bf16 / avx512_bf16)"
    speed = probe(d_model, tokens)
    shape = f"({max(16, min(tokens, 512))}, {d_model}) @ ({d_model}, {4 * d_model})"
    if speed >= 1 / PROBE_RATIO:
        return torch.bfloat16, (f"bf16 autocast: CPU has {'+'.join(flags)}; probe {shape} in bf16 "
                                f"{speed:.1f}x faster than fp32")
    return None, (f"fp32: CPU has {'+'.join(flags)} but the probe {shape} in bf16 runs at only "
                  f"{speed:.2f}x the fp32 speed (< {1 / PROBE_RATIO:.2f}x)")
