#!/usr/bin/env python
"""Issue 3 benchmark: Tiny Shakespeare validation loss of every preset at the nanoGPT CPU budget.

Each preset (configs/{attention,mamba,mamba2,h3,hybrid}.yaml; 2000 steps x 12 x 64 tokens,
char-level) is trained through seqlm's own loop, one after another in this process, then
scored on 200 validation batches (12 x 64 tokens each, the same batches for every preset).
``wall_s`` is the training loop's wall time (evals every 500 steps included, sampling not).
Reference: nanoGPT's CPU recipe reaches val loss 1.886 in 157 s on this machine class.
Prints one JSON object and writes bench/results/presets.json and docs/img/presets.png.

    python bench/presets.py                      # all presets, full budget (~15 min)
    python bench/presets.py --quick              # 100 steps each (smoke test)
    python bench/presets.py --presets hybrid h3  # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import machine_info  # noqa: E402
NANOGPT = {"val_loss": 1.886, "wall_s": 157}
PRESETS = ["attention", "mamba", "mamba2", "h3", "hybrid"]


def val_loss_fixed(model, data, n_batches: int = 200, B: int = 12, T: int = 64, seed: int = 1234) -> float:
    """Mean loss over the same ``n_batches`` random validation windows for every model."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    tot = 0.0
    with torch.no_grad():
        for _ in range(n_batches):
            x, y = data.get_batch("val", B, T, gen, torch.device("cpu"))
            tot += float(model.loss(x, y))
    return tot / n_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--quick", action="store_true", help="100 steps per preset, 20 val batches")
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every preset (e.g. train.dtype=fp32 train.threads=2); recorded per row")
    args = ap.parse_args()

    from seqlm.config import load_config
    from seqlm.data.dataset import load_data
    from seqlm.data.tokenizers import build_tokenizer
    from seqlm.io.checkpoint import load_model
    from seqlm.train.loop import train

    os.chdir(ROOT)
    steps = args.steps or (100 if args.quick else None)
    n_val = 20 if args.quick else 200
    results = {}
    for name in args.presets:
        path = ROOT / "configs" / f"{name}.yaml"
        if not path.exists():
            results[name] = {"error": f"{path.name} not found"}
            continue
        over = [f"train.out_dir=runs/bench_presets/{name}", "train.progress=false", "eval.sample_tokens=0"]
        if steps:
            over += [f"train.max_steps={steps}", "eval.every=0", f"train.warmup_steps={min(100, steps // 10)}"]
        cfg = load_config(path, over + list(args.set))
        print(f"[presets] training {name} ...", file=sys.stderr, flush=True)
        r = train(cfg)
        model, cfg2, tok = load_model(r["checkpoint"])
        data = load_data(cfg2.data, tok, seq_len=cfg2.train.seq_len)
        vl = val_loss_fixed(model, data, n_val)
        results[name] = {"pattern": "".join(_pattern_chars(cfg2)), "n_params": r["n_params"],
                         "val_loss": round(vl, 4), "val_loss_train_loop": round(r["val_loss"], 4),
                         "wall_s": round(r["wall_s"], 1), "tokens_per_s": round(r["tokens_per_s"]),
                         "steps": r["step"], "overrides": list(args.set), "dtype": cfg2.train.dtype,
                         "threads": cfg2.train.threads or torch.get_num_threads(), "machine": machine_info()}
        print(f"[presets] {name}: {results[name]}", file=sys.stderr, flush=True)
    res_path = ROOT / "bench" / "results" / "presets.json"
    if not args.quick and res_path.exists():  # a subset run updates the stored table
        old = json.loads(res_path.read_text()).get("presets", {})
        results = {**{k: v for k, v in old.items() if k not in results}, **results}
    ok = [n for n, r in results.items() if "val_loss" in r and n in ("hybrid", "h3")
          and r["val_loss"] <= 1.80 and r["wall_s"] <= NANOGPT["wall_s"]]
    out = {"budget": {"steps": steps or 2000, "batch": 12, "seq_len": 64, "val_batches": n_val},
           "threads": torch.get_num_threads(), "nanogpt_reference": NANOGPT, "presets": results,
           "target_hybrid_le_1.80_within_157s": bool(ok), "hybrids_meeting_target": ok}
    out["machine"] = machine_info()
    text = json.dumps(out, indent=2)
    print(text)
    if not args.quick:
        (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "bench" / "results" / "presets.json").write_text(text + "\n")
        _plot(results, ROOT / "docs" / "img" / "presets.png")


def _pattern_chars(cfg) -> list[str]:
    from seqlm import registry

    inv = {v: k for k, v in registry.pattern_chars().items()}
    return [inv.get(layer.type, "?") for layer in cfg.model.layers]


def _plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if "val_loss" in r:
            ax.scatter(r["wall_s"], r["val_loss"], s=40)
            ax.annotate(f"{name} ({r['n_params'] / 1e6:.2f}M)", (r["wall_s"], r["val_loss"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([NANOGPT["wall_s"]], [NANOGPT["val_loss"]], marker="x", c="k")
    ax.annotate("nanoGPT CPU recipe", (NANOGPT["wall_s"], NANOGPT["val_loss"]), textcoords="offset points",
                xytext=(5, -10), fontsize=8)
    ax.set_xlabel("training wall time (s), 2000 steps x 12 x 64 tokens")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Tiny Shakespeare presets at the nanoGPT CPU budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    main()
