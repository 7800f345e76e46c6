#!/usr/bin/env python
"""Layer scaling benchmark: forward+backward time and peak memory of ONE layer vs length L.

Blocks mamba, mamba2, h3 and attention (default configs), d_model 256, batch 1, fp32, CPU,
at L = 1k, 2k, 4k, 8k, 16k, 32k (``--quick``: up to 4k). The loss is ``(y * g).sum()`` with a
fixed random g, so backward runs through every parameter and the input.

Each (block, L) runs in a fresh subprocess, so one measurement cannot inherit another's
allocator high-water mark:
- time: best of ``--repeats`` forward+backward passes after one warm-up pass (wall ``time_s``;
  also ``cpu_s``, the process CPU time, which is robust to other load on a shared machine);
- peak memory: in a second fresh subprocess (glibc's mmap threshold fixed at 128 KiB, see
  MEM_ENV, so every tensor is its own mapping, returned to the OS on free), the process's peak
  resident set (``ru_maxrss``) after one pass minus its resident set just before it (block,
  parameters and input already allocated; a tiny L=64 pass has done the libraries' lazy
  inits): the extra memory the forward+backward held at its peak - activations, saved
  tensors, gradients, workspace.
The timed runs use the allocator settings seqlm's entry points apply (seqlm/cpualloc.py: heap
reuse up to 32 MiB, huge pages above; recorded in the JSON): without them the 4 KiB page
faults on fresh activations dominate from 16k tokens on and the SSM ratios were 45-62. The
memory runs set MALLOC_MMAP_THRESHOLD_, which leaves malloc at glibc's behaviour there.
Attention stops once a pass takes more than ``--max-seconds`` (the rest are listed as
skipped with the reason). Summary per block: t(Lmax)/t(Lmin) (target <= 40 for SSMs over
1k -> 32k, i.e. close to the 32x of linear scaling) and the log-log slopes of time and memory.

Prints one JSON object and writes bench/results/scaling.json and docs/img/scaling.png.

    python bench/scaling.py                # full (L up to 32k, 2 threads)
    python bench/scaling.py --quick        # L up to 4k (smoke test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import machine_info  # noqa: E402
BLOCKS = ["mamba", "mamba2", "h3", "attention"]
FULL_L = [1024, 2048, 4096, 8192, 16384, 32768]
QUICK_L = [1024, 2048, 4096]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(name: str, L: int, d_model: int, threads: int, repeats: int) -> dict:
    """One (block, L) measurement inside this (fresh) process."""
    import torch

    from seqlm import registry

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cls = registry.get_block(name)
    blk = cls(cls.Config(), d_model)

    def step(x, g):
        y, _ = blk(x)
        (y * g).sum().backward()
        blk.zero_grad(set_to_none=True)

    step(torch.randn(1, 64, d_model, requires_grad=True), torch.randn(1, 64, d_model))  # lazy inits
    x = torch.randn(1, L, d_model, requires_grad=True)
    g = torch.randn(1, L, d_model)
    rss0 = _rss_bytes()
    t, c = time.perf_counter(), time.process_time()
    step(x, g)
    first = (time.perf_counter() - t, time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0  # ru_maxrss: KiB
    times = [first]
    if first[0] < 30 and repeats > 0:  # slow passes are timed once
        times = []
        for _ in range(repeats):
            x.grad = None
            t, c = time.perf_counter(), time.process_time()
            step(x, g)
            times.append((time.perf_counter() - t, time.process_time() - c))
    return {"L": L, "time_s": min(times)[0], "cpu_s": min(t[1] for t in times),
            "peak_mem_mb": max(peak, 0) / 2**20}


# For the memory run: a fixed mmap threshold makes glibc serve every tensor above 128 KiB with
# its own mapping, returned to the OS on free. (By default the threshold grows after frees, so
# later tensors come from the heap and freed heap memory stays resident, which would count
# fragmentation as "peak".) It slows allocation down, so time is measured in a separate run.
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _run_worker(cmd: list[str], env: dict) -> dict | str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        return f"worker failed: {proc.stderr.strip()[-300:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    num = sum((a - mx) * (b - my) for a, b in pts)
    den = sum((a - mx) ** 2 for a, _ in pts)
    return num / den


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        Ls = [p["L"] for p in r["points"]]
        axes[0].loglog(Ls, [p["time_s"] for p in r["points"]], "o-", label=name, base=2)
        axes[1].loglog(Ls, [max(p["peak_mem_mb"], 1e-3) for p in r["points"]], "o-", label=name, base=2)
    for ax, lab in zip(axes, ["forward+backward time (s)", "peak extra memory (MiB)"]):
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="L up to 4k")
    ap.add_argument("--blocks", nargs="+", default=BLOCKS)
    ap.add_argument("--lengths", nargs="+", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop a block's sweep once one pass takes longer than this")
    ap.add_argument("--worker", nargs=2, metavar=("BLOCK", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.d_model, args.threads,
                                args.repeats)))
        return

    import seqlm  # sets THP_MEM_ALLOC_ENABLE, inherited by the workers (which import seqlm too)

    lengths = args.lengths or (QUICK_L if args.quick else FULL_L)
    results = {}
    for name in args.blocks:
        points, skipped = [], []
        for L in lengths:
            if points and points[-1]["time_s"] > args.max_seconds:
                skipped.append({"L": L, "reason": f"previous length took {points[-1]['time_s']:.1f} s "
                                                  f"> --max-seconds {args.max_seconds}"})
                continue
            cmd = [sys.executable, __file__, "--worker", name, str(L), "--d-model", str(args.d_model),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]
            p = _run_worker(cmd, {})
            if isinstance(p, str):
                skipped.append({"L": L, "reason": p})
                break
            mem = _run_worker(cmd + ["--repeats", "0"], MEM_ENV)
            p["peak_mem_mb"] = mem["peak_mem_mb"] if isinstance(mem, dict) else None
            points.append(p)
            print(f"{name:10s} L={L:6d}  {p['time_s']:.3f} s (cpu {p['cpu_s']:.3f} s)  "
                  f"{p['peak_mem_mb']:.1f} MiB", file=sys.stderr)
        Ls = [p["L"] for p in points]
        r = {"points": points, "skipped": skipped,
             "time_slope": slope(Ls, [p["time_s"] for p in points]),
             "mem_slope": slope(Ls, [p["peak_mem_mb"] for p in points])}
        if len(points) >= 2:
            r[f"time_ratio_{Ls[-1]}_over_{Ls[0]}"] = points[-1]["time_s"] / points[0]["time_s"]
            r[f"cpu_ratio_{Ls[-1]}_over_{Ls[0]}"] = points[-1]["cpu_s"] / points[0]["cpu_s"]
            r["mem_mb_per_1k_tokens"] = ((points[-1]["peak_mem_mb"] - points[0]["peak_mem_mb"])
                                         / ((Ls[-1] - Ls[0]) / 1024))
        r["loadavg_1min"] = os.getloadavg()[0]
        results[name] = r

    out = {"mode": "quick" if args.quick else "full", "d_model": args.d_model, "batch": 1,
           "dtype": "float32", "threads": args.threads, "repeats": args.repeats, "lengths": lengths,
           "memory_method": "peak RSS (ru_maxrss) minus RSS before one forward+backward, in a fresh "
                            "subprocess per (block, L) with MALLOC_MMAP_THRESHOLD_=131072",
           "cpu_alloc": seqlm.CPU_ALLOC,
           "ssm_target": "t(32k)/t(1k) <= 40", "blocks": results}
    res = ROOT / "bench" / "results" / "scaling.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    if not args.quick and res.exists():  # a subset run (--blocks) keeps the other blocks' rows
        old = json.loads(res.read_text())
        if old.get("threads") == args.threads and old.get("d_model") == args.d_model:
            out["blocks"] = {**{k: v for k, v in old["blocks"].items() if k not in results}, **results}
            results = out["blocks"]
    out["machine"] = machine_info(args.threads)
    res.write_text(json.dumps(out, indent=2) + "\n")
    plot(results, ROOT / "docs" / "img" / "scaling.png",
         f"one layer, d_model {args.d_model}, batch 1, fp32 CPU, {args.threads} thread(s)")
    print(json.dumps(out))


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    main()
