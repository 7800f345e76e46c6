#!/usr/bin/env python
"""Relaxed recursive sharing: parameters vs validation loss on char-level Tiny Shakespeare.

1. Train an unshared model (attention + MLP layers, pattern "*-") with seqlm's training loop.
2. Convert its checkpoint with the CLI path (``seqlm convert recursive --groups K --rank r``,
   SVD init from the average of the tied layers) at rank 0 (pure tying), 8 and 32.
3. Fine-tune every variant - the unshared model too, so all rows get the same extra budget -
   for the same number of steps (AdamW, cosine from ``ft_lr``), then measure the validation loss
   on the same fixed windows.

Prints one JSON object (also bench/results/recursive.json) and plots params vs val loss
(docs/img/recursive.png). ``--quick``: a small model and few steps, to prove the script runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import machine_info  # noqa: E402

from seqlm.cli import main as seqlm_main  # noqa: E402
from seqlm.config import TrainConfig, parse_config  # noqa: E402
from seqlm.data.dataset import load_data  # noqa: E402
from seqlm.io.checkpoint import load_model  # noqa: E402
from seqlm.train.loop import estimate_loss, train  # noqa: E402
from seqlm.train.optim import make_optimizer  # noqa: E402
from seqlm.train.schedule import lr_at  # noqa: E402

FULL = dict(d_model=128, n_layers=8, groups=2, pretrain=2000, finetune=300, batch=12, seq=64, eval_batches=50)
QUICK = dict(d_model=64, n_layers=4, groups=2, pretrain=120, finetune=30, batch=8, seq=64, eval_batches=10)


def run_cfg(p, out_dir):
    return parse_config({
        "model": {"d_model": p["d_model"], "pattern": "*-", "n_layers": p["n_layers"],
                  "block_defaults": {"attention": {"n_heads": 4}}},
        "data": {"files": [str(ROOT / "data" / "tinyshakespeare.txt")], "cache_dir": str(ROOT / ".cache" / "seqlm")},
        "train": {"seq_len": p["seq"], "batch_size": p["batch"], "max_steps": p["pretrain"], "lr": 1e-3,
                  "warmup_steps": min(100, p["pretrain"] // 10), "out_dir": str(out_dir), "progress": False,
                  "threads": 1},
        "eval": {"every": 0, "batches": p["eval_batches"], "sample_tokens": 0},
    })


def finetune(ckpt, p, cfg, steps, lr):
    """Same budget for every variant: ``steps`` AdamW steps, warmup then cosine, fixed batches."""
    model, _, tok = load_model(ckpt)
    data = load_data(cfg.data, tok, seq_len=p["seq"])
    dev = torch.device("cpu")
    before = estimate_loss(model, data, cfg, dev, None)
    tc = TrainConfig(max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10))
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(7)
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, tc)
        x, y = data.get_batch("train", p["batch"], p["seq"], gen, dev)
        model.loss(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    after = estimate_loss(model, data, cfg, dev, None)
    stack = sum(q.numel() for q in model.stack.parameters())
    return {"params": model.num_params(), "stack_params": stack, "val_loss_converted": before,
            "val_loss": after, "finetune_s": wall}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.scatter(r["stack_params"], r["val_loss"], label=r["name"])
        ax.annotate(r["name"], (r["stack_params"], r["val_loss"]), fontsize=8)
    ax.set_xlabel("stack parameters")
    ax.set_ylabel("val loss after fine-tuning")
    ax.set_title("Relaxed recursive: params vs val loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small model, few steps (a smoke run)")
    ap.add_argument("--ranks", default="0,8,32")
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recursive.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = QUICK if args.quick else FULL
    ranks = [int(r) for r in args.ranks.split(",")]
    # conversion reports go to stderr: stdout carries only the JSON object
    with tempfile.TemporaryDirectory(prefix="seqlm-rec-") as tmp, contextlib.redirect_stdout(sys.stderr):
        tmp = Path(tmp)
        cfg = run_cfg(p, tmp / "base")
        t0 = time.perf_counter()
        res = train(cfg)
        pre_s = time.perf_counter() - t0
        base = res["checkpoint"]
        rows = [{"name": "unshared", "rank": None, **finetune(base, p, cfg, p["finetune"], args.ft_lr)}]
        for r in ranks:
            out = tmp / f"rank{r}"
            rc = seqlm_main(["convert", "recursive", "--checkpoint", base, "--groups", str(p["groups"]),
                             "--rank", str(r), "--out", str(out)])
            if rc:
                raise SystemExit(f"conversion at rank {r} failed ({rc})")
            rows.append({"name": f"rank {r}", "rank": r, **finetune(out, p, cfg, p["finetune"], args.ft_lr)})
    result = {
        "bench": "recursive", "quick": args.quick,
        "setup": {**p, "pattern": "*-", "ft_lr": args.ft_lr, "init": "average", "data": "tinyshakespeare (char)"},
        "pretrain": {"val_loss": res["val_loss"], "wall_s": pre_s, "params": res["n_params"]},
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["machine"] = machine_info(1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, ROOT / "docs" / "img" / "recursive.png")
    return 0 if all(math.isfinite(r["val_loss"]) for r in rows) else 1


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    sys.exit(main())
