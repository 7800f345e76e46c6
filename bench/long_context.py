#!/usr/bin/env python
"""Longest trainable context of the default hybrid at d_model 256 under a fixed memory cap,
with and without activation checkpointing, and the step time at equal context.

Model: configs/hybrid.yaml (pattern ``2-2-2-*-2-2-2-``: 6 Mamba-2, 1 attention, 7 MLP) with
d_model 256 (Mamba-2 head_dim 32 so that it divides d_inner = 512), char vocabulary (65),
batch 1, fp32, AdamW. One training step = forward + backward + optimizer step.

Each (mode, L) runs in a fresh subprocess whose data segment is capped with
``RLIMIT_DATA`` (``--cap-gib``; Linux counts heap and private anonymous mappings, i.e. every
tensor): a step that needs more fails to allocate, so "trainable" means a step really
completed under the cap. The subprocess also reports its peak resident set (ru_maxrss).
Workers run with MALLOC_MMAP_THRESHOLD_=131072 (glibc gives every tensor above 128 KiB its
own mapping and unmaps it when freed), so the cap applies to live tensors, not to freed
heap that seqlm's allocator setting would otherwise keep (seqlm/cpualloc.py).
L grows by sqrt(2) from 1024 until a step fails (or ``--max-len``); the checkpointed sweep
starts at the grid point nearest ``--start-ratio`` times the plain run's longest (its shorter
lengths would pass anyway and cost most of the bench's time on a shared CPU; 0 sweeps all).
The step time at equal context is the best of two steps of both modes at ``--time-len``,
run side by side.

    nice -n 10 python bench/long_context.py              # cap 1 GiB, 1 thread
Writes bench/results/long_context.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse
import json
import math
import os
import resource
import subprocess
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, write_result  # noqa: E402


def build(mode: str):
    import torch
    import yaml

    from seqlm.config import parse_config
    from seqlm.model import LM

    raw = yaml.safe_load((ROOT / "configs" / "hybrid.yaml").read_text())
    m = raw["model"]
    m["d_model"] = 256
    m["block_defaults"]["mamba2"]["head_dim"] = 32
    cfg = parse_config({"model": m})
    torch.manual_seed(0)
    model = LM(cfg.model, 65)
    model.set_activation_checkpointing(mode)
    return model


def worker(mode: str, L: int, threads: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = build(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(n):
        x = torch.randint(0, 65, (1, n))
        loss = model.loss(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(128)  # lazy inits, optimizer state
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            step(L)
            times.append(time.perf_counter() - t)
    except (RuntimeError, MemoryError) as e:  # allocation refused under the cap
        return {"ok": False, "error": str(e).splitlines()[0][:160]}
    return {"ok": True, "step_s": min(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(mode, L, cap_gib, threads, steps=1):
    def limit():
        if cap_gib:
            cap = int(cap_gib * (1 << 30))
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    # every tensor above 128 KiB its own mapping, unmapped when freed: resident memory tracks
    # live tensors (seqlm's heap-reuse setting would keep freed memory, see seqlm/cpualloc.py)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="131072")
    p = subprocess.run([sys.executable, __file__, "--worker", mode, str(L), str(threads), str(steps)],
                       capture_output=True, text=True, env=env, preexec_fn=limit)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1][:160] if p.stderr.strip() else ''}"}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--time-len", type=int, default=1024)
    ap.add_argument("--sweep-log", default=None,
                    help="take the sweep from this stderr log of an earlier run (e.g. one stopped for time)")
    ap.add_argument("--time-rounds", type=int, default=2, help="interleaved timing rounds")
    ap.add_argument("--start-ratio", type=float, default=4.0,
                    help="checkpointed sweep starts at this multiple of the plain longest (0: at 1024)")
    ap.add_argument("--worker", nargs=4, default=None)
    a = ap.parse_args()
    if a.worker:
        mode, L, th, steps = a.worker
        print(json.dumps(worker(mode, int(L), int(th), int(steps))))
        return
    import torch

    out = {"bench": "long_context", "cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__,
           "model": "configs/hybrid.yaml pattern 2-2-2-*-2-2-2-, d_model 256, mamba2 head_dim 32, vocab 65, "
                    "batch 1, fp32, AdamW", "cap_gib": a.cap_gib, "runs": {}}
    best = {}
    logged = {}
    if a.sweep_log:  # reuse the per-length results a previous (stopped) run printed to stderr
        import ast

        for line in Path(a.sweep_log).read_text().splitlines():
            mode, _, rec = line.partition(" ")
            if mode in ("none", "layers") and rec.startswith("{"):
                logged.setdefault(mode, []).append(ast.literal_eval(rec))
        out["sweep_from_log"] = str(a.sweep_log)
    for mode in ("none", "layers"):
        if mode in logged:
            out["runs"][mode] = logged[mode]
            ok = [r["L"] for r in logged[mode] if r["ok"]]
            if ok:
                best[mode] = max(ok)
            continue
        runs, k = [], 0
        if mode == "layers" and a.start_ratio and best.get("none"):
            # start the (slow) checkpointed sweep at start_ratio x the plain run's longest
            k = max(0, round(2 * math.log2(a.start_ratio * best["none"] / 1024)))
        while True:
            L = int(round(1024 * math.sqrt(2) ** k / 64)) * 64
            if L > a.max_len:
                break
            r = run(mode, L, a.cap_gib, a.threads)
            r["L"] = L
            runs.append(r)
            print(mode, r, file=sys.stderr, flush=True)
            if not r["ok"]:
                break
            best[mode] = L
            k += 1
        out["runs"][mode] = runs
    out["longest"] = best
    if best.get("none"):
        out["ratio_longest"] = best.get("layers", 0) / best["none"]
    # step time at equal context, both modes side by side (twice, interleaved), no cap
    t = {"none": [], "layers": []}
    out["step_time_rounds"] = a.time_rounds
    for _ in range(a.time_rounds):
        for mode in t:
            r = run(mode, a.time_len, 0, a.threads, steps=2)
            t[mode].append(r.get("step_s", float("nan")))
    out["step_time"] = {"L": a.time_len, "none_s": min(t["none"]), "layers_s": min(t["layers"]),
                        "ratio_layers_over_none": min(t["layers"]) / min(t["none"])}
    write_result("long_context", out)


if __name__ == "__main__":
    main()
