#!/usr/bin/env python
"""Issue 2 benchmark: the nanoGPT CPU recipe shape on char-level Tiny Shakespeare.

Runs, in one process: (1) the machine's fp32 matmul peak, (2) a plain single-file PyTorch
GPT of the same shape (the baseline every framework is compared with), (3) seqlm's
attention config through seqlm's own training loop. Prints one JSON object (also written
to bench/results/train_shakespeare.json).

Shape: 4 layers, 4 heads, d_model 128, block 64, batch 12, 2000 iterations, AdamW lr 1e-3
cosine to 1e-4, warmup 100, wd 0.1, beta2 0.99, clip 1.0. Reference: nanoGPT reaches val
loss 1.886 in 2 min 37 s on this machine class. Throughput is measured over the training
steps only (no eval); FLOPs per token = 6 * (matmul params) + 12 * n_layers * d * T.
The speed ratio comes from an interleaved timing phase (rounds of 20 steps of each model,
alternating, same batches), so background load hits both models alike.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import machine_info  # noqa: E402


def matmul_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """Best sustained fp32 GFLOP/s of an n x n matmul (a few sizes, best wins)."""
    best = 0.0
    for size in (512, n, 2 * n):
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        dt = time.perf_counter() - t0
        best = max(best, 2 * size ** 3 * reps / dt / 1e9)
    return best


# ---------------------------------------------------------------------------------------
# the plain single-file GPT baseline (nanoGPT-style: learned positions, LayerNorm, fused qkv)
class PlainBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.fc2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab, d=128, n_layers=4, h=4, block=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(PlainBlock(d, h) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def loss(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def train_plain(data, vocab, iters, args):
    from seqlm.train.schedule import lr_at
    from seqlm.config import TrainConfig

    tc = TrainConfig(max_steps=iters, lr=1e-3, min_lr=1e-4, warmup_steps=100)
    torch.manual_seed(1337)
    model = PlainGPT(vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=True)
    gen = torch.Generator().manual_seed(1337)
    t0 = time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, tc)
        x, y = data.get_batch("train", 12, 64, gen)
        loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    model.eval()
    egen = torch.Generator().manual_seed(1338)
    with torch.no_grad():
        val = sum(model.loss(*data.get_batch("val", 12, 64, egen)).item() for _ in range(200)) / 200
    n_mm = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("wpe"))
    return {"val_loss": val, "wall_s": wall, "tokens_per_s": iters * 12 * 64 / wall, "matmul_params": n_mm}


def interleaved_throughput(models: dict, data, rounds: int = 8, steps: int = 20) -> dict:
    """tokens/s of each (model, optimizer) pair, timed in alternating rounds on the same batches."""
    gen = torch.Generator().manual_seed(0)
    batches = [data.get_batch("train", 12, 64, gen) for _ in range(steps)]

    def run(m, opt):
        for x, y in batches:
            m.loss(x, y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for m, opt in models.values():
        run(m, opt)  # warm-up
    spent = {k: 0.0 for k in models}
    for _ in range(rounds):
        for k, (m, opt) in models.items():
            t0 = time.perf_counter()
            run(m, opt)
            spent[k] += time.perf_counter() - t0
    return {k: rounds * steps * 12 * 64 / v for k, v in spent.items()}


def flops_per_token(matmul_params: int, n_layers=4, d=128, T=64) -> float:
    return 6 * matmul_params + 12 * n_layers * d * T


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--config", default=str(ROOT / "configs" / "attention.yaml"))
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()

    from seqlm.config import load_config
    from seqlm.data.dataset import load_data
    from seqlm.data.tokenizers import build_tokenizer
    from seqlm.io import build_model
    from seqlm.train.loop import estimate_loss, train

    os.chdir(ROOT)
    peak = matmul_peak()
    out_dir = ROOT / "runs" / "bench_train_shakespeare"
    cfg = load_config(args.config, [f"train.max_steps={args.iters}", f"train.out_dir={out_dir}",
                                    "eval.every=0", "eval.sample_tokens=0", "train.progress=false",
                                    "train.log_every=100"])
    tok = build_tokenizer(cfg.data.tokenizer, cfg.data.files, text_field=cfg.data.text_field)
    data = load_data(cfg.data, tok)

    res = {"shape": {"n_layers": 4, "n_heads": 4, "d_model": 128, "block": 64, "batch": 12, "iters": args.iters},
           "threads": torch.get_num_threads(), "matmul_peak_gflops": round(peak, 1),
           "nanogpt_reference": {"val_loss": 1.886, "wall_s": 157, "tokens_per_s": 9800}}
    from seqlm.train.optim import make_optimizer

    torch.manual_seed(0)
    sm = build_model(cfg, tok.vocab_size)
    pm = PlainGPT(tok.vocab_size)
    tput = interleaved_throughput({
        "seqlm": (sm, make_optimizer(sm, cfg.train)),
        "plain": (pm, torch.optim.AdamW(pm.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)),
    }, data)
    n_mm = sum(p.numel() for p in sm.parameters() if p.dim() == 2)
    res["throughput_interleaved"] = {
        k: {"tokens_per_s": v, "gflops": flops_per_token(n_mm) * v / 1e9,
            "fraction_of_peak": flops_per_token(n_mm) * v / 1e9 / peak} for k, v in tput.items()}
    res["speed_ratio_seqlm_over_plain"] = tput["seqlm"] / tput["plain"]
    if not args.skip_plain:
        plain = train_plain(data, tok.vocab_size, args.iters, args)
        plain["gflops"] = flops_per_token(plain["matmul_params"]) * plain["tokens_per_s"] / 1e9
        plain["fraction_of_peak"] = plain["gflops"] / peak
        res["plain_gpt"] = plain

    s = train(cfg)
    model = build_model(cfg, tok.vocab_size)
    from seqlm.io.checkpoint import load_weights

    load_weights(model, s["checkpoint"])
    cfg200 = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batches": 200})})
    val200 = estimate_loss(model, data, cfg200, torch.device("cpu"), None)
    n_mm = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    gflops = flops_per_token(n_mm) * s["tokens_per_s"] / 1e9
    res["seqlm"] = {"config": os.path.relpath(args.config, ROOT), "val_loss": val200, "wall_s": s["wall_s"],
                    "tokens_per_s": s["tokens_per_s"], "n_params": s["n_params"], "matmul_params": n_mm,
                    "gflops": gflops, "fraction_of_peak": gflops / peak}
    res["targets"] = {"val_loss<=1.89": val200 <= 1.89,
                      "speed_ratio>=1": res["speed_ratio_seqlm_over_plain"] >= 1.0,
                      "fraction_of_peak>=0.40": res["throughput_interleaved"]["seqlm"]["fraction_of_peak"] >= 0.40}
    res["machine"] = machine_info()
    text = json.dumps(res, indent=2)
    print(text)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "train_shakespeare.json").write_text(text + "\n")


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    main()
