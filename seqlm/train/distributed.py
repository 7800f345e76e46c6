"""Multi-process training on DeepSpeed (``train()`` comes here when a launcher started
several ranks; one process without a launcher never does).

- ranks form DeepSpeed's [dp, tp] mesh; the model is built full-size with the run's seed on
  every rank, then sharded by its blocks' plans (seqlm/parallel/tp.py);
- DeepSpeed's engine does data parallelism and ZeRO 0/1/2 with its AdamW; the LR follows
  seqlm's schedule (set per optimizer step), so 1 rank = the single-process loop;
- data: every rank draws the same global batch of ``batch_size x dp`` windows and keeps its
  DP rank's rows (TP ranks of one replica get identical batches; a run at DP=2 sees the
  windows a single process with twice the batch sees). Global batch = micro-batch x
  grad_accum x DP size;
- checkpoints: DeepSpeed's own (``<out>/ds_checkpoint``, exact resume at the same layout;
  read back through torch's restricted unpickler, seqlm/parallel/engine.py) and a
  consolidated seqlm checkpoint (``<out>/checkpoint``, unsharded safetensors) that
  single-process eval/generate and any TP size load;
- failure: collectives time out after ``distributed.timeout_s``; the rank that sees it
  exits non-zero naming itself and the peer it waited for (the launcher then stops the job).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from seqlm.config import RunConfig
from seqlm.io import build_model, load_weights, maybe_init_from, read_meta, save_checkpoint
from seqlm.io.checkpoint import CheckpointError
from seqlm.parallel import engine as E
from seqlm.parallel.tp import gather_state_dict, shard_model
from seqlm.train.metrics import MetricsLog
from seqlm.train.optim import param_groups
from seqlm.train.schedule import lr_at


def _draw(data, split, tc, gen, dp, dp_rank, device):
    """This DP rank's rows of the global batch: (x, y, seq_idx or None)."""
    from seqlm.train.loop import _unpack

    batch = _unpack(data.get_batch(split, tc.batch_size * dp, tc.seq_len, gen, device))
    sl = slice(dp_rank * tc.batch_size, (dp_rank + 1) * tc.batch_size)
    return tuple(None if t is None else t[sl] for t in batch)


def train_distributed(cfg: RunConfig, resume=None, stop_at: Optional[int] = None) -> dict:
    from seqlm.train.loop import _prepare, autocast, autocast_dtype

    tc, dc = cfg.train, cfg.distributed
    E.init_distributed(dc.timeout_s)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    tp_group, dp_group = E.init_groups(dc.tp_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    device = E.device()
    amp = autocast_dtype(tc, device, verbose=dist.get_rank() == 0, d_model=cfg.model.d_model)
    if tc.dtype == "auto" and device.type == "cpu":  # a timed probe: every rank takes rank 0's answer
        flag = torch.tensor([0 if amp is None else 1])
        dist.broadcast(flag, src=0)
        amp = torch.bfloat16 if flag.item() else None
    ds_bf16 = amp is not None and device.type == "cuda"  # DeepSpeed's bf16 mode on GPU
    out = Path(tc.out_dir)
    ds_dir = out / "ds_checkpoint"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, resume, stop_at, tp_group, dp_group, rank, world, dp, dp_rank, device,
                    None if ds_bf16 else amp, ds_bf16, out, ds_dir, _prepare, autocast)
    except (RuntimeError, dist.DistBackendError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if any(w in str(e).lower() for w in ("timeout", "timed out", "connection", "closed", "reset")):
            print(f"seqlm: rank {rank}/{world}: a collective failed after at most "
                  f"distributed.timeout_s={dc.timeout_s:g}s (a peer rank died or hangs): {msg}",
                  file=sys.stderr, flush=True)
            os._exit(3)  # no destructor may wait on the broken process group
        raise


def _run(cfg, resume, stop_at, tp_group, dp_group, rank, world, dp, dp_rank, device, amp, ds_bf16,
         out, ds_dir, _prepare, autocast):
    tc, dc = cfg.train, cfg.distributed
    # data/token caches: rank 0 builds them, the others read them
    if rank == 0:
        tok, data, ckpt = _prepare(cfg, resume)
    dist.barrier()
    if rank != 0:
        tok, data, ckpt = _prepare(cfg, resume)
    torch.manual_seed(tc.seed)
    model = build_model(cfg, tok.vocab_size)
    if ckpt is None and tc.init_from:
        load_weights(model, tc.init_from)
    elif ckpt is None:
        maybe_init_from(model, cfg)
    tag = None if ckpt is None else f"step{read_meta(ckpt)['step']}"
    if ckpt is not None and not (ds_dir / tag).is_dir():
        print(f"--resume: no DeepSpeed state for {tag} in {str(ds_dir)!r}; continuing from the weights "
              f"of {str(ckpt)!r} with a fresh optimizer", file=sys.stderr)
        load_weights(model, ckpt)
    n_params = model.num_params()
    model = shard_model(model.to(device), tp_group, ladder_overlap=dc.ladder_overlap)
    conf = E.ds_config(cfg, dp, device, ds_bf16)
    if rank == 0:
        (out / "deepspeed_config.json").write_text(json.dumps(conf, indent=2))
    engine = E.build_engine(model, param_groups(model, tc.weight_decay), conf)
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    here = {"tp": dc.tp_size, "dp": dp, "zero": dc.zero_stage}
    if ckpt is not None and (ds_dir / tag).is_dir():
        layout = json.loads((ds_dir / tag / "layout.json").read_text())
        if layout != here:
            raise CheckpointError(
                f"--resume: {str(ds_dir / tag)!r} was written at {layout}, this run is {here}; resume at that "
                f"layout, or start from the consolidated weights with train.init_from={str(ckpt)!r} "
                f"(the optimizer state restarts)")
        client = E.load_ds_checkpoint(engine, ds_dir, tag)  # restricted unpickler: no code runs
        step = client["step"]
        gen.set_state(client["data_generator"])
        torch.set_rng_state(client["torch_rng"])
    elif ckpt is not None:
        step = read_meta(ckpt)["step"]

    def save(**meta):
        """DeepSpeed's checkpoint (exact resume, same layout), then the consolidated seqlm one."""
        t = f"step{step}"
        engine.save_checkpoint(str(ds_dir), tag=t, client_state={
            "step": step, "data_generator": gen.get_state(), "torch_rng": torch.get_rng_state()})
        full = gather_state_dict(model)
        p = None
        if rank == 0:
            (ds_dir / t / "layout.json").write_text(json.dumps(here))
            flat = build_model(cfg, tok.vocab_size)
            flat.load_state_dict(full)
            p = save_checkpoint(out / "checkpoint", flat, cfg, tok, None,
                                {"tp_size": dc.tp_size, "dp_size": dp, "zero_stage": dc.zero_stage, **meta},
                                step=step, keep_last=tc.keep_last)
        dist.barrier()
        return p or out / "checkpoint"

    log = MetricsLog(out, truncate_after=step if ckpt is not None else None) if rank == 0 else None
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * dp  # the whole job
    end = min(tc.max_steps, stop_at) if stop_at is not None else tc.max_steps
    bar = tqdm(total=tc.max_steps, initial=step, disable=not tc.progress or rank != 0, desc="train",
               unit="step", dynamic_ncols=True)
    engine.train()
    t0 = t_win = time.perf_counter()
    step0, tok_win, loss_val = step, 0, float("nan")
    while step < end:
        lr = lr_at(step, tc)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(tc.grad_accum):
            x, y, seq_idx = _draw(data, "train", tc, gen, dp, dp_rank, device)
            with autocast(device, amp):
                loss = engine(x, y) if seq_idx is None else engine(x, y, seq_idx=seq_idx)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
        dist.all_reduce(loss_sum, group=dp_group)
        loss_val = loss_sum.item() / (tc.grad_accum * dp)
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"loss became {loss_val} at step {step}; lower train.lr or check the data")
        step += 1
        tok_win += tokens_per_step
        bar.update(1)
        if (step % tc.log_every == 0 or step == end) and log is not None:
            now = time.perf_counter()
            tps = tok_win / max(now - t_win, 1e-9)
            t_win, tok_win = now, 0
            gn = engine.get_global_grad_norm()
            log.log("train", step, loss=loss_val, lr=lr, tokens_per_s=tps,
                    grad_norm=float(gn) if gn is not None else None)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}")
        elif step % tc.log_every == 0 or step == end:
            engine.get_global_grad_norm()
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < end:
            save()
    bar.close()
    wall = time.perf_counter() - t0
    tps = (step - step0) * tokens_per_step / max(wall, 1e-9)
    res = {"step": step, "train_loss": loss_val, "wall_s": wall, "tokens_per_s": tps, "n_params": n_params,
           "world_size": world, "tp_size": dc.tp_size, "dp_size": dp, "rank": rank}
    if step < tc.max_steps:
        res.update(checkpoint=str(save()), stopped=True)
        if log is not None:
            log.close()
        return res
    from seqlm.train.loop import estimate_loss

    val = estimate_loss(model, data, cfg, device, amp)
    path = save(val_loss=val)
    if log is not None:
        log.log("eval", step, val_loss=val, val_ppl=math.exp(val))
        log.close()
    res.update(val_loss=val, val_ppl=math.exp(val), checkpoint=str(path), sample="")
    if rank == 0:
        res["meta"] = read_meta(path)
    return res
