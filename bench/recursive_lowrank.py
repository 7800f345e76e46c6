#!/usr/bin/env python
"""Relaxed-recursive LoRA: merge W' + s B A per forward vs apply the factors to x
(x W'^T + s (x A^T) B^T), and what seqlm runs (``seqlm.recursive.lora_linear``: the cheaper
form by multiply-adds), forward + backward of one shared Linear, side by side.

Merging costs out*in*r multiply-adds per call (plus the (out, in) weight write); the
factored form costs N*(in+out)*r for N tokens (backward: both double), so the factors win
while N*(in+out) < out*in (N < 256 tokens for 512 x 512, < 410 for 512 x 2048): decode and
small batches; merging wins at training sizes. Without gradients (generation) seqlm caches
the merged weight, so decode pays nothing either way.

    nice -n 10 python bench/recursive_lowrank.py
Writes bench/results/recursive_lowrank.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import json
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, write_result  # noqa: E402


def main():
    import torch
    import torch.nn.functional as F


    torch.set_num_threads(1)
    out = {"bench": "recursive_lowrank", "cpu": cpu_model(), "threads": 1, "torch": torch.__version__,
           "rank": 8, "results": []}
    from seqlm.recursive import factored_is_cheaper, lora_linear

    for N in (8, 64, 256, 512, 2048):
        for i, o in ((512, 512), (512, 2048)):
            x = torch.randn(N, i, requires_grad=True)
            W, A, B = (torch.randn(*s, requires_grad=True) for s in ((o, i), (8, i), (o, 8)))
            fns = {"merged": lambda: F.linear(x, torch.addmm(W, B, A, alpha=0.5)),
                   "factored": lambda: torch.addmm(F.linear(x, W), F.linear(x, A), B.t(), alpha=0.5),
                   "dispatched": lambda: lora_linear(x, W, None, A, B, 0.5)}
            best = {k: float("inf") for k in fns}
            for _ in range(2):
                for f in fns.values():
                    f().sum().backward()
            for _ in range(5):  # interleaved: same load for all
                for k, f in fns.items():
                    t = time.perf_counter()
                    f().sum().backward()
                    best[k] = min(best[k], time.perf_counter() - t)
            r = {"tokens": N, "in": i, "out": o, "merged_ms": best["merged"] * 1e3,
                 "factored_ms": best["factored"] * 1e3, "dispatched_ms": best["dispatched"] * 1e3,
                 "dispatch_picks": "factored" if factored_is_cheaper(N, i, o) else "merged",
                 "factored_over_merged": best["factored"] / best["merged"],
                 "dispatched_over_best": best["dispatched"] / min(best["merged"], best["factored"])}
            out["results"].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    write_result("recursive_lowrank", out)


if __name__ == "__main__":
    main()
