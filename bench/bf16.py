#!/usr/bin/env python
"""fp32 vs ``train.dtype: auto`` (bf16 autocast where the CPU has native bf16 matmul) training
of a d_model 512, 8-layer model, for an attention (``*-``) and a Mamba-2 (``2-``) stack.

For each stack two copies of the same initialised model train on the same Tiny Shakespeare
windows (char vocabulary, batch 8 x 256 tokens, AdamW lr 1e-3 after 10 warmup steps), their
steps alternating, so the step-time ratio is measured side by side on a shared machine:
one copy in fp32, one under the dtype ``auto`` picks (seqlm/train/precision.py; the decision
and its reason are recorded). Reported: median step time of each (after 2 warm-up steps),
their ratio, and the final loss of each (mean of the last 10 steps' training losses) with
the relative difference. ``--steps`` defaults to 300 (the issue's); the JSON records the number
used and the load average, and is written after each stack.

    nice -n 10 python bench/bf16.py [--steps 300]
Writes bench/results/bf16.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse
import copy
import os
import json
import statistics
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--patterns", default="*-,2-")
    a = ap.parse_args()
    import torch

    from seqlm.config import parse_config
    from seqlm.data.tokenizers import CharTokenizer
    from seqlm.model import LM
    from seqlm.train.precision import choose_cpu_dtype, cpu_bf16_flags

    torch.set_num_threads(a.threads)
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.fit([text])
    ids = torch.from_numpy(tok.encode_array(text).astype(np.int64))
    B, T = 8, 256
    amp, why = choose_cpu_dtype(512, B * T)
    out = {"bench": "bf16", "cpu": cpu_model(), "cpu_bf16_flags": cpu_bf16_flags(), "threads": a.threads,
           "torch": torch.__version__, "batch": B, "seq_len": T, "steps": a.steps,
           "auto_choice": "bf16" if amp is not None else "fp32", "auto_reason": why, "results": {},
           "loadavg_1min": {"start": os.getloadavg()[0]}}
    print(why, file=sys.stderr)
    for pattern in a.patterns.split(","):
        cfg = parse_config({"model": {"d_model": 512, "pattern": pattern, "n_layers": 8,
                                      "block_defaults": {"attention": {"n_heads": 8}}}})
        torch.manual_seed(0)
        base = LM(cfg.model, tok.vocab_size)
        models = {"fp32": base, "auto": copy.deepcopy(base)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
                for k, m in models.items()}
        gen = torch.Generator().manual_seed(0)
        times = {k: [] for k in models}
        losses = {k: [] for k in models}
        for step in range(a.steps):
            offs = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
            x = torch.stack([ids[o:o + T] for o in offs])
            y = torch.stack([ids[o + 1:o + T + 1] for o in offs])
            lr = 1e-3 * min(1.0, (step + 1) / 10)
            for k in (("fp32", "auto") if step % 2 == 0 else ("auto", "fp32")):
                for g in opts[k].param_groups:
                    g["lr"] = lr
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(k == "auto" and amp is not None)):
                    loss = models[k].loss(x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(models[k].parameters(), 1.0)
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if step >= 2:
                    times[k].append(time.perf_counter() - t)
                losses[k].append(loss.item())
            if step % 10 == 0:
                print(pattern, step, {k: round(v[-1], 4) for k, v in losses.items()}, file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        fin = {k: float(np.mean(v[-10:])) for k, v in losses.items()}
        r = {"fp32_step_s": med["fp32"], "auto_step_s": med["auto"], "speedup_auto_over_fp32": med["fp32"] / med["auto"],
             "fp32_final_loss": fin["fp32"], "auto_final_loss": fin["auto"],
             "final_loss_rel_diff": (fin["auto"] - fin["fp32"]) / fin["fp32"],
             "n_params": base.num_params()}
        out["results"][pattern] = r
        out["loadavg_1min"][f"after {pattern}"] = os.getloadavg()[0]
        print(pattern, json.dumps(r), file=sys.stderr, flush=True)
        res = ROOT / "bench" / "results" / "bf16.json"  # after each stack: a long run keeps what it measured
        res.parent.mkdir(exist_ok=True)
        res.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
