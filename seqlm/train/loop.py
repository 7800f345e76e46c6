"""The training loop: one function, ``train(cfg)``, used by ``train.py`` and ``seqlm train``.

Single process (CPU or one GPU). Deterministic on CPU: a run resumed from a checkpoint
continues with exactly the losses and weights of an uninterrupted run, because the
checkpoint holds model, optimizer, step, global RNG and data-sampler generator states, all
taken at a step boundary (before the step draws its batches), and the LR schedule is a pure
function of the step.

Checkpoints go to ``<out_dir>/checkpoint/step-N`` (seqlm/io/checkpoint.py: crash-safe, the
newest ``train.keep_last`` kept). SIGINT (Ctrl-C) and SIGTERM (schedulers, spot instances)
only set a flag: the loop writes a checkpoint at the next step boundary and returns
(a second Ctrl-C stops at once, without one). ``resume=True`` continues from the newest
checkpoint of out_dir, or starts fresh when there is none yet, so one command both starts
and restarts a preemptible job. A step whose loss or gradient is not finite is skipped (no
update; counted as ``bad_steps``); more than ``train.max_bad_steps`` in a row stop the run
with a checkpoint of the state before the first of them.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from seqlm.config import ConfigError, RunConfig
from seqlm.io import build_model
from seqlm.io import maybe_init_from
from seqlm.io.checkpoint import (CheckpointError, clean_stale, find_checkpoint, load_trainer_state,
                                 load_weights, read_meta, save_checkpoint)
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

    if getattr(cfg.data, "task", None) is not None:  # a synthetic task instead of text
        from seqlm.data.tasks import load_task

        return (*load_task(cfg.data.task, cfg.train.seq_len), _resume_from(cfg, resume))
    ckpt = _resume_from(cfg, resume)
    if ckpt is not None:
        tok = _load_tok(ckpt, "--resume")
    elif cfg.train.init_from:
        src = find_checkpoint(cfg.train.init_from)  # fine-tuning: the checkpoint's tokenizer, ids unchanged
        if src is None or not (src / "tokenizer").exists():
            raise CheckpointError(f"train.init_from: no checkpoint at {str(cfg.train.init_from)!r}")
        tok = _load_tok(src, "train.init_from")
    elif getattr(cfg, "memory", None) is not None and cfg.memory.init_from:
        src = find_checkpoint(cfg.memory.init_from)  # HMT stage 2: keep the stage-1 checkpoint's tokenizer
        if src is None or not (src / "tokenizer").exists():
            raise CheckpointError(f"memory.init_from: no checkpoint at {str(cfg.memory.init_from)!r} "
                                  f"(tokenizer/ missing)")
        tok = _load_tok(src, "memory.init_from")
    else:
        tok = build_tokenizer(cfg.data.tokenizer, data=cfg.data)
    return tok, load_data(cfg.data, tok, seq_len=cfg.train.seq_len), ckpt


def _resume_from(cfg: RunConfig, resume) -> Optional[Path]:
    """The checkpoint directory to resume from: None for a fresh run, or for ``resume=True``
    when out_dir has no checkpoint yet (auto resume); an explicit path must hold one."""
    if not resume:
        return None
    where = Path(cfg.train.out_dir) / "checkpoint" if resume is True else Path(resume)
    ckpt = find_checkpoint(where)
    if ckpt is None and resume is not True:
        raise CheckpointError(f"--resume: no checkpoint at {str(where)!r}")
    if ckpt is None:
        print(f"--resume: no checkpoint in {str(where)!r} yet; starting a fresh run")
    return ckpt


def _load_tok(ckpt: Path, what: str):
    from seqlm.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(ckpt / "tokenizer")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: checkpoint {str(ckpt)!r}: tokenizer/: {e}") from None


class NonFiniteLossError(ValueError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class _StopSignals:
    """SIGINT / SIGTERM set ``received`` (checkpoint at the next step boundary) instead of
    killing the loop; a second SIGINT raises KeyboardInterrupt at once. Main thread only."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _rng_state(gen: torch.Generator) -> dict:
    return {"data": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def train(cfg: RunConfig, resume=None, stop_at: Optional[int] = None, objective=None) -> dict:
    """Train per ``cfg``; ``resume`` = True (the newest checkpoint of out_dir, or a fresh start
    when there is none) or a checkpoint path; ``stop_at`` ends the run after that step with a
    checkpoint (for interrupted runs). Returns final metrics: val_loss, val_ppl, tokens_per_s,
    wall_s, sample, checkpoint (the step directory written last). A run stopped by SIGINT /
    SIGTERM returns ``stopped: True`` and ``signal``.
    ``objective`` (pluggable loss, e.g. seqlm/distill): ``objective.setup(model, device)`` runs
    once after the model is built, before the optimizer (it may freeze parameters and own extra
    modules such as a teacher); ``objective.loss(model, x, y)`` then replaces ``model.loss(x, y)``
    in the training steps. Validation still reports the model's own cross-entropy.
    Under a multi-rank launcher (deepspeed / torchrun) the DeepSpeed path runs instead
    (seqlm/train/distributed.py, objectives included; the distill runner refuses orient/align
    stages at distributed.tp_size > 1)."""
    from seqlm.parallel.engine import launched

    if launched():
        from seqlm.train.distributed import train_distributed

        return train_distributed(cfg, resume, stop_at, objective=objective)
    if cfg.distributed.tp_size > 1:
        raise ConfigError(f"distributed.tp_size: {cfg.distributed.tp_size} needs that many ranks; start "
                          f"them with `deepspeed --num_gpus N train.py ...` or `torchrun --nproc_per_node N ...`")
    with _StopSignals() as sig:
        return _train(cfg, resume, stop_at, sig, objective)


def _train(cfg: RunConfig, resume, stop_at: Optional[int], sig: _StopSignals, objective=None) -> dict:
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
    if objective is not None:
        objective.setup(model, device)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    step, bad_total, bad_run = 0, 0, 0
    root = out / "checkpoint"
    if ckpt is not None:
        st = load_trainer_state(ckpt)
        if st is None:
            raise CheckpointError(f"--resume: {str(ckpt)!r} has no trainer state (a model-only checkpoint); "
                                  f"start a new run from its weights with train.init_from")
        load_weights(model, ckpt)
        try:
            opt.load_state_dict(st["optimizer"])
            gen.set_state(st["rng"]["data"])
            torch.set_rng_state(st["rng"]["torch"])
            if torch.cuda.is_available() and st["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(st["rng"]["cuda"])
            step, bad_total = int(st["step"]), int(st.get("bad_steps", 0))
            if tc.dtype == "auto" and st.get("amp") in ("bf16", "fp32"):  # the run's own choice, not a new probe
                amp = torch.bfloat16 if st["amp"] == "bf16" else None
                print(f"train.dtype auto -> {st['amp']}, as the run chose before the checkpoint")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"--resume: checkpoint {str(ckpt)!r}: the trainer state does not fit this "
                                  f"run ({type(e).__name__}: {e})") from None
        print(f"resuming from {ckpt} at step {step}")
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

    saved = {"step": None, "path": None}

    def checkpoint(at_step=None, rng=None, bad=None, **meta):
        """Save the state at a step boundary (default: now, which must be one)."""
        at_step = step if at_step is None else at_step
        state = {"step": at_step, "optimizer": opt.state_dict(), "rng": rng or _rng_state(gen),
                 "bad_steps": bad_total if bad is None else bad, "amp": "fp32" if amp is None else "bf16"}
        path = save_checkpoint(root, model, cfg, tok, state, meta, step=at_step, keep_last=tc.keep_last)
        saved.update(step=at_step, path=path)
        return path

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    end = min(tc.max_steps, stop_at) if stop_at is not None else tc.max_steps
    bar = tqdm(total=tc.max_steps, initial=step, disable=not tc.progress, desc="train", unit="step",
               dynamic_ncols=True)
    model.train()
    t0, t_win, step0, tok_win = time.perf_counter(), time.perf_counter(), step, 0
    loss_val, val_loss = float("nan"), None
    bad_from = None  # (step, rng state, bad_total) at the boundary before the current bad run
    try:
        while step < end:
            if sig.received:
                break
            boundary = _rng_state(gen) if bad_run == 0 else None  # before this step draws anything
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for _ in range(tc.grad_accum):
                x, y, seq_idx = _unpack(data.get_batch("train", tc.batch_size, tc.seq_len, gen, device))
                with autocast(device, amp):
                    if objective is not None:
                        loss = objective.loss(fwd, x, y) if seq_idx is None else objective.loss(fwd, x, y, seq_idx=seq_idx)
                    else:
                        loss = _loss(fwd, x, y, seq_idx) if fwd is model else _compiled_loss(fwd, x, y, seq_idx)
                (loss / tc.grad_accum).backward()
                loss_sum += loss.item()
            loss_val = loss_sum / tc.grad_accum
            gnorm = _grad_norm(model, tc.grad_clip) if math.isfinite(loss_val) else float("nan")
            if math.isfinite(loss_val) and math.isfinite(gnorm):
                opt.step()
                bad_run, bad_from = 0, None
            else:  # skip the update; stop after too many in a row
                if bad_run == 0:
                    bad_from = (step, boundary, bad_total)
                bad_run, bad_total = bad_run + 1, bad_total + 1
                log.log("skip", step + 1, loss=loss_val, grad_norm=gnorm, bad_steps=bad_total)
                bar.write(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_val) else 'gradient'} "
                          f"({loss_val}); step skipped ({bad_run} in a row, {bad_total} in all)")
                if bad_run > tc.max_bad_steps:
                    opt.zero_grad(set_to_none=True)
                    first, rng, bad = bad_from
                    path = checkpoint(first, rng, bad, stopped="non-finite loss")
                    raise NonFiniteLossError(
                        f"train.max_bad_steps: {bad_run} consecutive steps ({first + 1}..{step + 1}) had a "
                        f"non-finite loss or gradient; stopped. The checkpoint {path} holds the state before "
                        f"them: lower train.lr (or raise train.grad_clip / check the data) and continue with "
                        f"--resume train.lr=...")
            opt.zero_grad(set_to_none=True)
            step += 1
            tok_win += tokens_per_step
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                now = time.perf_counter()
                tps = tok_win / max(now - t_win, 1e-9)
                t_win, tok_win = now, 0
                log.log("train", step, loss=loss_val, lr=lr, tokens_per_s=tps,
                        grad_norm=gnorm if tc.grad_clip > 0 else None, bad_steps=bad_total)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < tc.max_steps:
                val_loss = estimate_loss(model, data, cfg, device, amp)
                log.log("eval", step, val_loss=val_loss, val_ppl=math.exp(val_loss))
                bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})")
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < end and bad_run == 0:
                checkpoint()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a checkpoint
        bar.close()
        log.close()
        last = find_checkpoint(root)
        print(f"\ninterrupted twice at step {step}: stopped without a checkpoint"
              + (f"; the last one is {last} (continue with --resume)" if last else ""))
        raise
    except BaseException:
        bar.close()
        log.close()
        raise
    bar.close()
    wall = time.perf_counter() - t0
    trained_tps = (step - step0) * tokens_per_step / max(wall, 1e-9)
    if step < tc.max_steps:  # stopped early (stop_at or a signal): checkpoint and return
        path = saved["path"] if saved["step"] == step else checkpoint(
            **({"interrupted": sig.received} if sig.received else {}))
        log.close()
        if sig.received:
            print(f"\n{sig.received}: stopped at step {step}; checkpoint written to {path} "
                  f"(continue with --resume)")
        return {"step": step, "train_loss": loss_val, "checkpoint": str(path), "stopped": True,
                "signal": sig.received, "wall_s": wall, "tokens_per_s": trained_tps, "n_params": n_params,
                "bad_steps": bad_total}
    val_loss = estimate_loss(model, data, cfg, device, amp)
    log.log("eval", step, val_loss=val_loss, val_ppl=math.exp(val_loss))
    path = checkpoint(val_loss=val_loss)
    log.close()
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{n_params / 1e6:.2f}M params")
    sample = ""
    if cfg.eval.sample_tokens:
        model.eval()
        prompt = torch.tensor(tok.encode(cfg.eval.sample_prompt) or [tok.eos_id], device=device)
        ids = model.generate(prompt, cfg.eval.sample_tokens, cfg.eval.temperature, cfg.eval.top_k,
                             cfg.eval.top_p, seed=tc.seed)
        # the sample echoes its prompt (decoded with it, so a multi-token prompt stays whole)
        sample = tok.decode((prompt.tolist() if cfg.eval.sample_prompt else []) + ids.tolist())
    return {"step": step, "train_loss": loss_val, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "tokens_per_s": trained_tps, "wall_s": wall, "n_params": n_params, "sample": sample,
            "checkpoint": str(path), "meta": read_meta(path), "bad_steps": bad_total}


def _grad_norm(model, clip: float) -> float:
    """Global gradient norm (clipping to ``clip`` when > 0); nan/inf when a gradient is."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0


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
