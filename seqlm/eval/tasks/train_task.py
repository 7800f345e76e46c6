"""Train fresh small models on a task (Zoology's recipe) and report the best accuracy.

Zoology (Arora et al.) trains 2-layer models (each layer = a sequence mixer + an MLP) of width
64-256 on MQAR with AdamW, a cosine schedule and a learning-rate sweep, and reports the best
accuracy over the sweep. Here the model is seqlm's own (``build_model`` / ``LM`` with a
pattern such as ``"*-*-"``), the optimizer is seqlm's AdamW (``make_optimizer``) and the
schedule is ``lr_at``; the loss is cross-entropy at the labelled positions only (the LM head
is applied to those hidden states alone, which is the same loss as full logits with -100
labels, and cheap for a V = 8192 vocabulary).

    res = train_mqar(MQARSpec(64, 4), mixer="attention", d_model=64)
    res["best"]["accuracy"]
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from seqlm.config import ModelConfig, RunConfig, TrainConfig
from seqlm.eval.tasks.mqar import IGNORE, MQARSpec, make_mqar, select_logits
from seqlm.io import build_model
from seqlm.train.optim import make_optimizer
from seqlm.train.schedule import lr_at

# one sequence mixer per Zoology layer, each followed by an MLP ("-")
MIXER_PATTERNS = {
    "attention": "*-*-",
    "mamba": "M-M-",
    "mamba2": "2-2-",
    "h3": "H-H-",
    "hybrid": "2-*-",  # Mamba-2 layer then attention layer
}


def task_model_config(mixer: str = "attention", d_model: int = 64, vocab_size: int = 8192,
                      pattern: Optional[str] = None, block_defaults: Optional[dict] = None) -> ModelConfig:
    """A 2-layer (mixer + MLP) x 2 model; ``pattern`` overrides the mixer's default pattern."""
    if pattern is None:
        if mixer not in MIXER_PATTERNS:
            raise ValueError(f"mixer: unknown {mixer!r}; known: {sorted(MIXER_PATTERNS)}")
        pattern = MIXER_PATTERNS[mixer]
    heads = max(1, d_model // 64)  # head width 64, as Zoology's attention baselines
    defaults = {"attention": {"n_heads": heads}, "mlp": {"kind": "gelu"}}
    from seqlm.registry import blocks

    reg = blocks()
    if "mamba2" in reg:  # head_dim must divide expand * d_model
        defaults["mamba2"] = {"head_dim": min(32, 2 * d_model), "d_state": 16, "chunk_size": 64}
    if "h3" in reg:
        defaults["h3"] = {"d_state": 64}
    for k, v in (block_defaults or {}).items():
        defaults[k] = {**defaults.get(k, {}), **v}
    used = {c for c in pattern}
    from seqlm.registry import pattern_chars

    names = pattern_chars()
    missing = sorted(c for c in used if c not in names)
    if missing:
        raise KeyError(f"block not registered for pattern chars {missing} (pattern {pattern!r})")
    keep = {names[c] for c in used}
    defaults = {k: v for k, v in defaults.items() if k in keep}
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, pattern=pattern, block_defaults=defaults,
                       tie_embeddings=True)


def _accuracy(model, x, y, batch_size, device) -> float:
    model.eval()
    hit = n = 0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
            m = yb != IGNORE
            pred = select_logits(model, xb, m).argmax(-1)
            hit += int((pred == yb[m]).sum())
            n += int(m.sum())
    model.train()
    return hit / max(n, 1)


def train_once(model_cfg: ModelConfig, train_data, test_data, lr: float, steps: int, batch_size: int = 64,
               weight_decay: float = 0.1, warmup_frac: float = 0.1, seed: int = 0, device="cpu",
               eval_every: int = 0, target: Optional[float] = None,
               time_budget_s: Optional[float] = None) -> dict:
    """Train one fresh model; returns accuracy on ``test_data`` and the training trace.

    ``target``: stop early once a periodic evaluation (every ``eval_every`` steps) reaches it.
    ``time_budget_s``: stop (and evaluate) once this much wall time has passed."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(RunConfig(model=model_cfg)).to(device)
    tc = TrainConfig(lr=lr, min_lr=lr * 0.1, max_steps=steps, warmup_steps=int(warmup_frac * steps),
                     schedule="cosine", weight_decay=weight_decay, beta2=0.99, grad_clip=1.0)
    opt = make_optimizer(model, tc)
    xtr, ytr = train_data
    xte, yte = test_data
    gen = torch.Generator().manual_seed(seed + 1)
    perm, pi = torch.randperm(xtr.shape[0], generator=gen), 0
    trace, t0, step, acc = [], time.perf_counter(), 0, None
    model.train()
    while step < steps:
        if pi + batch_size > perm.numel():  # next epoch
            perm, pi = torch.randperm(xtr.shape[0], generator=gen), 0
        idx = perm[pi:pi + batch_size]
        pi += batch_size
        xb, yb = xtr[idx].to(device), ytr[idx].to(device)
        m = yb != IGNORE
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        loss = F.cross_entropy(select_logits(model, xb, m).float(), yb[m])
        if not math.isfinite(loss.item()):
            trace.append({"step": step, "loss": float("nan")})
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        over = time_budget_s is not None and time.perf_counter() - t0 > time_budget_s
        if (eval_every and step % eval_every == 0) or over:
            acc = _accuracy(model, xte, yte, 256, device)
            trace.append({"step": step, "loss": loss.item(), "accuracy": acc,
                          "wall_s": time.perf_counter() - t0})
            if (target is not None and acc >= target) or over:
                break
    acc = _accuracy(model, xte, yte, 256, device)
    return {"lr": lr, "accuracy": acc, "steps": step, "wall_s": time.perf_counter() - t0,
            "final_loss": trace[-1]["loss"] if trace else loss.item(), "trace": trace,
            "n_params": model.num_params(), "model": model}


def train_on_task(model_cfg: ModelConfig, train_data, test_data, lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
                  steps: int = 1000, batch_size: int = 64, seed: int = 0, device="cpu",
                  keep_model: bool = False, progress: Optional[Callable[[dict], None]] = None,
                  stop_at_target: bool = False, **kw) -> dict:
    """Learning-rate sweep (Zoology): one fresh model per lr; returns every run and the best.

    ``stop_at_target``: skip the remaining learning rates once a run reached ``kw["target"]``
    (a CPU budget saver; the runs done are all reported)."""
    runs = []
    best_model = None
    for lr in lrs:
        r = train_once(model_cfg, train_data, test_data, lr, steps, batch_size, seed=seed, device=device, **kw)
        model = r.pop("model")
        if best_model is None or r["accuracy"] > max(x["accuracy"] for x in runs):
            best_model = model
        runs.append(r)
        if progress is not None:
            progress(r)
        if stop_at_target and kw.get("target") is not None and r["accuracy"] >= kw["target"]:
            break
    best = max(runs, key=lambda r: r["accuracy"])
    out = {"runs": runs, "best": best, "accuracy": best["accuracy"], "best_lr": best["lr"]}
    if keep_model:
        out["model"] = best_model
    return out


def train_mqar(spec: MQARSpec = MQARSpec(), mixer: str = "attention", d_model: int = 64,
               n_train: int = 20000, n_test: int = 1000, seed: int = 0, pattern: Optional[str] = None,
               **kw) -> dict:
    """Zoology's MQAR experiment for one (mixer, width, setting): returns train_on_task's dict."""
    cfg = task_model_config(mixer, d_model, spec.vocab_size, pattern)
    train = make_mqar(n_train, spec, seed=seed)
    test = make_mqar(n_test, spec, seed=seed + 10_000)
    out = train_on_task(cfg, train, test, seed=seed, **kw)
    out.update(spec=spec.to_dict(), mixer=mixer, d_model=d_model, pattern=cfg.layers and "".join(
        {"attention": "*", "mlp": "-"}.get(l.type, l.type[0]) for l in cfg.layers))
    return out
