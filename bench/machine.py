"""The machine a benchmark ran on, recorded in every bench's JSON (CPU model from lscpu,
threads, torch version, GPU if any), so a table can state where its numbers come from."""
from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_isa() -> list[str]:
    """The SIMD extensions that matter for torch's CPU kernels (AVX2, AVX-512, AMX ...)."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "fma")
    return [f for f in keep if f in flags]


def machine_info(threads=None) -> dict:
    import torch

    info = {"cpu_model": cpu_model(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(),
            "threads": threads if threads is not None else torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, out: dict) -> None:
    """Write ``out`` to bench/results/<name>.json (indented) and print it as one JSON line."""
    import json
    from pathlib import Path

    res = Path(__file__).resolve().parent / "results" / f"{name}.json"
    res.parent.mkdir(exist_ok=True)
    res.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
