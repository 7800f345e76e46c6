"""The training loop: one function, ``train(cfg)``, used by ``train.py`` and ``seqlm train``.

Single process (CPU or one GPU). Deterministic on CPU: a run resumed from a checkpoint
continues with exactly the losses and weights of an uninterrupted run, because the
checkpoint holds model, optimizer, step, global RNG and data-sampler generator states and
the LR schedule is a pure function of the step.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from seqlm.config import RunConfig
from seqlm.io import build_model
from seqlm.io import maybe_init_from
from seqlm.io.checkpoint import (CheckpointError, load_trainer_state, load_weights, read_meta,
                                 save_checkpoint)
from seqlm.train.metrics import MetricsLog, plot_losses
from seqlm.train.optim import make_optimizer
from seqlm.train.schedule import lr_at


def resolve_device(tcfg) -> torch.device:
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda requested but torch.cuda.is_available() is False")
    if tcfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(tcfg.device)


def autocast_dtype(tcfg, device: torch.device, verbose: bool = False, d_model: int = 512) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default; on CPU ``auto`` picks bf16 only where the CPU has
    native bf16 matrix products that are faster at this width (seqlm/train/precision.py) and
    prints which and why."""
    if tcfg.dtype == "bf16" or (tcfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if tcfg.dtype == "auto" and device.type == "cpu":
        from seqlm.train.precision import choose_cpu_dtype

        dtype, why = choose_cpu_dtype(d_model, tcfg.batch_size * tcfg.seq_len)
        if verbose:
            print(f"train.dtype auto -> {why}")
        return dtype
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def estimate_loss(model, data, cfg: RunConfig, device, amp, split: str = "val") -> float:
    """Mean loss over ``eval.batches`` windows drawn with a fixed seed (same windows each call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    total = 0.0
    for _ in range(cfg.eval.batches):
        x, y, seq_idx = _unpack(data.get_batch(split, cfg.train.batch_size, cfg.train.seq_len, gen, device))
        with autocast(device, amp):
            total += _loss(model, x, y, seq_idx).item()
    model.train(was_training)
    return total / cfg.eval.batches


def _prepare(cfg: RunConfig, resume):
    """Tokenizer, data and the checkpoint to resume from (None for a fresh run)."""
    from seqlm.data.dataset import load_data
    from seqlm.data.tokenizers import build_tokenizer, load_tokenizer

    ckpt = None
    if resume:
        ckpt = Path(cfg.train.out_dir) / "checkpoint" if resume is True else Path(resume)
        if not (ckpt / "model.safetensors").exists():
            raise CheckpointError(f"--resume: no checkpoint at {str(ckpt)!r}")
        tok = load_tokenizer(ckpt / "tokenizer")
    elif cfg.train.init_from:
        src = Path(cfg.train.init_from)  # fine-tuning: the checkpoint's tokenizer, ids unchanged
        if not (src / "tokenizer").exists() or not (src / "model.safetensors").exists():
            raise CheckpointError(f"train.init_from: no checkpoint at {str(src)!r}")
        tok = load_tokenizer(src / "tokenizer")
    elif getattr(cfg, "memory", None) is not None and cfg.memory.init_from:
        src = Path(cfg.memory.init_from)  # HMT stage 2: keep the stage-1 checkpoint's tokenizer
        if not (src / "tokenizer").exists():
            raise CheckpointError(f"memory.init_from: no checkpoint at {str(src)!r} (tokenizer/ missing)")
        tok = load_tokenizer(src / "tokenizer")
    else:
        tok = build_tokenizer(cfg.data.tokenizer, cfg.data.files, text_field=cfg.data.text_field)
    return tok, load_data(cfg.data, tok, seq_len=cfg.train.seq_len), ckpt


def train(cfg: RunConfig, resume=None, stop_at: Optional[int] = None) -> dict:
    """Train per ``cfg``; ``resume`` = True (out_dir/checkpoint) or a checkpoint path;
    ``stop_at`` ends the run after that step with a checkpoint (for interrupted runs).
    Returns final metrics: val_loss, val_ppl, tokens_per_s, wall_s, sample, checkpoint."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc)
    amp = autocast_dtype(tc, device, verbose=True, d_model=cfg.model.d_model)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok, data, ckpt = _prepare(cfg, resume)
    torch.manual_seed(tc.seed)
    model = build_model(cfg, tok.vocab_size).to(device)
    model.set_activation_checkpointing(tc.activation_checkpointing, tc.activation_checkpoint_k)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    if ckpt is not None:
        st = load_trainer_state(ckpt)
        if st is None:
            raise CheckpointError(f"--resume: {str(ckpt)!r} has no trainer.pt (a model-only checkpoint)")
        load_weights(model, ckpt)
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["data_generator"])
        torch.set_rng_state(st["torch_rng"])
        if torch.cuda.is_available() and st.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        step = st["step"]
    elif tc.init_from:  # fresh run from trained weights (fine-tuning, converted checkpoints)
        load_weights(model, tc.init_from)
        print(f"initialised from {tc.init_from}")
    else:  # fresh run: HMT stage 2 starts from a stage-1 (or plain LM) checkpoint (memory.init_from)
        maybe_init_from(model, cfg)
    n_params = model.num_params()
    if hasattr(model, "param_counts"):  # HMT: report the memory's extra parameters
        c = model.param_counts()
        print(f"HMT: backbone {c['backbone']:,} params + memory {c['hmt']:,} "
              f"({c['hmt_pct_of_backbone']:.2f}% extra)")
    log = MetricsLog(out, truncate_after=step if ckpt is not None else None)
    fwd = torch.compile(model) if tc.compile else model

    def checkpoint(path, **meta):
        state = {"optimizer": opt.state_dict(), "data_generator": gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "step": step,
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        return save_checkpoint(path, model, cfg, tok, state, {"step": step, **meta})

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    end = min(tc.max_steps, stop_at) if stop_at is not None else tc.max_steps
    bar = tqdm(total=tc.max_steps, initial=step, disable=not tc.progress, desc="train", unit="step",
               dynamic_ncols=True)
    model.train()
    t0, t_win, step0, tok_win = time.perf_counter(), time.perf_counter(), step, 0
    loss_val, val_loss = float("nan"), None
    try:
        while step < end:
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for _ in range(tc.grad_accum):
                x, y, seq_idx = _unpack(data.get_batch("train", tc.batch_size, tc.seq_len, gen, device))
                with autocast(device, amp):
                    loss = _loss(fwd, x, y, seq_idx) if fwd is model else _compiled_loss(fwd, x, y, seq_idx)
                (loss / tc.grad_accum).backward()
                loss_sum += loss.item()
            loss_val = loss_sum / tc.grad_accum
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step}; lower train.lr or check the data")
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tok_win += tokens_per_step
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                now = time.perf_counter()
                tps = tok_win / max(now - t_win, 1e-9)
                t_win, tok_win = now, 0
                log.log("train", step, loss=loss_val, lr=lr, tokens_per_s=tps,
                        grad_norm=float(gnorm) if gnorm is not None else None)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < tc.max_steps:
                val_loss = estimate_loss(model, data, cfg, device, amp)
                log.log("eval", step, val_loss=val_loss, val_ppl=math.exp(val_loss))
                bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})")
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < end:
                checkpoint(out / "checkpoint")
    except KeyboardInterrupt:
        bar.close()
        path = checkpoint(out / "checkpoint", interrupted=True)
        log.close()
        print(f"\ninterrupted at step {step}; checkpoint written to {path} (continue with --resume)")
        raise
    bar.close()
    wall = time.perf_counter() - t0
    trained_tps = (step - step0) * tokens_per_step / max(wall, 1e-9)
    if step < tc.max_steps:  # stopped early on purpose: checkpoint and return
        path = checkpoint(out / "checkpoint")
        log.close()
        return {"step": step, "train_loss": loss_val, "checkpoint": str(path), "stopped": True,
                "wall_s": wall, "tokens_per_s": trained_tps, "n_params": n_params}
    val_loss = estimate_loss(model, data, cfg, device, amp)
    log.log("eval", step, val_loss=val_loss, val_ppl=math.exp(val_loss))
    path = checkpoint(out / "checkpoint", val_loss=val_loss)
    log.close()
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{n_params / 1e6:.2f}M params")
    sample = ""
    if cfg.eval.sample_tokens:
        model.eval()
        prompt = torch.tensor(tok.encode(cfg.eval.sample_prompt) or [tok.eos_id], device=device)
        ids = model.generate(prompt, cfg.eval.sample_tokens, cfg.eval.temperature, cfg.eval.top_k,
                             cfg.eval.top_p, seed=tc.seed)
        sample = tok.decode(ids.tolist())
    return {"step": step, "train_loss": loss_val, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "tokens_per_s": trained_tps, "wall_s": wall, "n_params": n_params, "sample": sample,
            "checkpoint": str(path), "meta": read_meta(path)}


def _unpack(batch):
    """(x, y) in stream packing, (x, y, seq_idx) in document packing -> (x, y, seq_idx or None)."""
    return (*batch, None) if len(batch) == 2 else tuple(batch)


def _loss(model, x, y, seq_idx):
    """model.loss, with the document boundaries only in document packing."""
    return model.loss(x, y) if seq_idx is None else model.loss(x, y, seq_idx=seq_idx)


def _compiled_loss(fwd, x, y, seq_idx=None):
    import torch.nn.functional as F

    logits, _ = fwd(x) if seq_idx is None else fwd(x, seq_idx=seq_idx)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
