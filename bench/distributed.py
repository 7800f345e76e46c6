#!/usr/bin/env python
"""Distributed training on DeepSpeed, measured on this machine (CPU ranks over gloo).

All rows run the same code path (seqlm/parallel + DeepSpeed's engine, torch AdamW) on the
default hybrid (configs/default.yaml's model, vocab 65) at the same global batch
(``--batch`` windows of ``--seq`` tokens per optimizer step), one thread per rank:

1. step time at 1 process, TP=2 and DP=2 (ZeRO-2, micro-batch = batch / 2);
2. ladder vs standard residual at TP=2: step time with the ladder's async all-reduce
   overlap, the ladder without it, the standard residual; and the share of the
   all-reduce time hidden by the overlap = 1 - (time blocked waiting, overlapped) /
   (time in the same all-reduces run synchronously);
3. communication bytes per step per rank at TP=2: predicted from the plan (every
   row-parallel output, block-input gradient, norm statistic and summed replicated
   gradient) next to a count taken by wrapping torch.distributed's collectives;
4. parameter + gradient + optimizer-state bytes per rank at ZeRO 0/1/2 (DP=2) and TP=2
   (ZeRO 0): measured from the tensors the engine holds, next to the layout's prediction.

The machine has 2 cores shared with other jobs: ranks compete with each other (and with
the communication threads) for them, so multi-rank rows are not faster than 1 process
here; the ratios are what this machine gives, measured side by side in one run.

    python bench/distributed.py            # 3 warm-up + 10 timed steps per row
    python bench/distributed.py --quick    # 1 + 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds a tokenize.py that would shadow the standard library's (torch imports it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

V = 65


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- worker (one rank) ------------------------------------------------------------------------
def worker(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from seqlm.config import load_config
    from seqlm.io import build_model
    from seqlm.parallel import engine as E
    from seqlm.parallel.tp import shard_model
    from seqlm.train.optim import param_groups

    E.init_distributed()
    variants = (["standard:False", "ladder:False", "ladder:True"] if args.residual == "compare"
                else [f"{args.residual}:{args.overlap}"])
    runs = []
    for v in variants:
        residual, overlap = v.split(":")
        cfg = load_config(ROOT / "configs" / "default.yaml",
                          [f"distributed.tp_size={args.tp}", f"distributed.zero_stage={args.zero}",
                           f"model.residual={residual}",
                           f"train.batch_size={args.batch // (int(os.environ['WORLD_SIZE']) // args.tp)}",
                           f"train.seq_len={args.seq}", "train.grad_clip=1.0"])
        tp_group, dp_group = E.init_groups(args.tp)
        dp = dist.get_world_size(dp_group)
        torch.manual_seed(0)
        model = build_model(cfg, V)
        shard_model(model, tp_group, ladder_overlap=overlap == "True")
        conf = E.ds_config(cfg, dp, torch.device("cpu"), False)
        runs.append((v, model, E.build_engine(model, param_groups(model, cfg.train.weight_decay), conf)))

    counts = {"bytes": 0, "calls": 0, "sync_s": 0.0}
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "reduce", "reduce_scatter"]
    orig = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(n, f):
        def g(*a, **kw):
            t = a[1] if n in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter") \
                else (a[0] if a else kw.get("tensor"))
            grp = kw.get("group")
            if grp is None or dist.get_world_size(grp) > 1:  # a 1-rank group moves no bytes
                if isinstance(t, torch.Tensor):
                    counts["bytes"] += t.numel() * t.element_size()
                elif isinstance(t, (list, tuple)):
                    counts["bytes"] += sum(x.numel() * x.element_size() for x in t)
                counts["calls"] += 1
            t0 = time.perf_counter()
            r = f(*a, **kw)
            if not kw.get("async_op"):
                counts["sync_s"] += time.perf_counter() - t0
            return r
        return g

    gen = torch.Generator().manual_seed(0)
    B = args.batch // dp
    tok = torch.randint(0, V, (args.batch, args.seq + 1), generator=gen)
    r0 = dist.get_rank(dp_group)
    x, y = tok[r0 * B:(r0 + 1) * B, :-1], tok[r0 * B:(r0 + 1) * B, 1:]
    stats = {v: {"times": [], "exposed": [], "sync": [], "bytes": []} for v, _, _ in runs}
    out = {}
    for i in range(args.warmup + args.steps):
        for v, model, engine in runs:  # variants alternate step by step: same contention
            ov = getattr(model, "tp_overlap", [])
            for o in ov:
                o.reset_stats()
            counts.update(bytes=0, calls=0, sync_s=0.0)
            dist.barrier()  # ranks start each timed step together (no skew carried over)
            for n, f in orig.items():
                setattr(dist, n, wrap(n, f))
            t = time.perf_counter()
            loss = engine(x, y)
            engine.backward(loss)
            if i == args.warmup + args.steps - 1:
                mem_grads = grad_bytes(engine, model)
            engine.step()
            dt = time.perf_counter() - t
            for n, f in orig.items():
                setattr(dist, n, f)
            if i >= args.warmup:
                st = stats[v]
                st["times"].append(dt)
                st["exposed"].append(sum(o.exposed_s for o in ov))
                st["sync"].append(counts["sync_s"])
                st["bytes"].append(counts["bytes"])
            if i == args.warmup + args.steps - 1:
                mem = memory(engine, model)
                mem["grads"] = mem_grads
                st = stats[v]
                out[v] = {"step_s": statistics.median(st["times"]), "step_s_all": st["times"],
                          "exposed_wait_s": statistics.median(st["exposed"]),
                          "sync_collective_s": statistics.median(st["sync"]), "bytes_counted": st["bytes"][-1],
                          "bytes_predicted": predicted_bytes(model, args, B) if args.tp > 1 else None,
                          "memory": mem, "loss": loss.item(),
                          "local_params": sum(p.numel() for p in model.parameters())}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out if len(runs) > 1 else out[runs[0][0]]))


def grad_bytes(engine, model):
    """Gradient bytes held after backward: p.grad (ZeRO 0/1) or ZeRO-2's reduced partition
    and its bucket buffers."""
    import torch

    tot = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt = engine.optimizer
    for g in getattr(opt, "averaged_gradients", {}).values():
        tot += sum(t.numel() * t.element_size() for t in (g or []) if isinstance(t, torch.Tensor))
    for t in getattr(opt, "ipg_buffer", None) or []:
        tot += t.numel() * t.element_size()
    return tot


def memory(engine, model):
    """Bytes this rank holds: parameters, gradients, optimizer state (Adam moments and
    ZeRO's fp32 master partitions)."""
    import torch

    seen = set()

    def nb(ts):
        tot = 0
        for t in ts:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                tot += t.untyped_storage().nbytes()
        return tot

    params = nb(model.parameters())
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = nb(v for s in inner.state.values() for v in s.values())
    master = nb(getattr(opt, "single_partition_of_fp32_groups", []))
    return {"params": params, "optimizer": state + master}


def predicted_bytes(model, args, B):
    """Collective bytes of one step at TP from the plan: forward, each block's row-parallel
    outputs (and the spanning gated norm's statistics); backward, each block's input gradient
    (copy_to), x_proj-style outputs again (row_grad), the norm statistics again, and the
    replicated-with-summed-gradient parameters (or parts)."""
    from seqlm.blocks.base import Block
    from seqlm.blocks.plan import Replicate, Split, local_ranges

    T, D, f = args.seq, model.cfg.d_model, 4
    tok = B * T
    total = 0
    for blk in (m for m in model.modules() if isinstance(m, Block)):
        calls = 1  # each block runs once per pass (no recursion in the default hybrid)
        fwd = bwd = 0
        for path, kind in blk.tp_reduce(args.tp).items():
            mod = blk.get_submodule(path)
            if kind in ("row", "row_grad"):
                fwd += tok * mod.out_features
                bwd += tok * mod.out_features if kind == "row_grad" else 0
            elif kind == "norm":
                fwd += tok * blk.G
                bwd += tok * blk.G
        bwd += tok * D  # copy_to at the block input
        total += calls * (fwd + bwd) * f
    for p in model.parameters():
        spec = getattr(p, "tp_spec", None)
        if isinstance(spec, Replicate) and spec.grad_sum:
            total += p.numel() * f
        elif isinstance(spec, Split):
            for a, b, rep in local_ranges(spec, sum(q.size for q in spec.parts) if spec.parts else
                                          p.shape[spec.dim] * args.tp, args.tp, 0):
                if rep:
                    total += (b - a) * p.numel() // p.shape[spec.dim] * f
    return total


# -- driver ------------------------------------------------------------------------------------
def run(world, tp, zero, residual, overlap, a):
    out = Path(a.tmp) / f"r{world}_{tp}_{zero}_{residual}_{overlap}.json"
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--tp", str(tp), "--zero", str(zero), "--residual", residual,
             "--overlap", str(overlap), "--out", str(out), "--batch", str(a.batch), "--seq", str(a.seq),
             "--steps", str(a.steps), "--warmup", str(a.warmup)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"rank failed ({world=}, {tp=}, {zero=}):\n{err[-3000:]}")
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--residual", default="standard", help="standard | ladder | compare (all three)")
    ap.add_argument("--overlap", type=lambda s: s == "True", default=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the 1-proc / TP=2 / DP=2 rows")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", default="/tmp")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.quick:
        a.steps, a.warmup, a.rounds = 3, 1, 1
    Path(a.tmp).mkdir(parents=True, exist_ok=True)
    import torch

    rows, rounds = {}, {"1proc": [], "tp2": [], "dp2_zero2": []}
    for _ in range(a.rounds):  # the step-time rows in alternating rounds; each row's best round
        for k, world, tp, zero in (("1proc", 1, 1, 0), ("tp2", 2, 2, 0), ("dp2_zero2", 2, 1, 2)):
            rounds[k].append(run(world, tp, zero, "standard", False, a))
    for k, rs in rounds.items():
        rows[k] = min(rs, key=lambda r: r["step_s"])
        rows[k]["rounds_step_s"] = [r["step_s"] for r in rs]
    cmp = run(2, 2, 0, "compare", False, a)  # standard / ladder / ladder + overlap, interleaved
    rows["tp2_standard_i"], rows["tp2_ladder_sync"], rows["tp2_ladder_overlap"] = (
        cmp["standard:False"], cmp["ladder:False"], cmp["ladder:True"])
    rows["dp2_zero0"] = run(2, 1, 0, "standard", False, a)
    rows["dp2_zero1"] = run(2, 1, 1, "standard", False, a)
    base = rows["1proc"]["step_s"]
    lo, ls = rows["tp2_ladder_overlap"], rows["tp2_ladder_sync"]
    # the all-reduces the overlap makes asynchronous: their synchronous time in the sync run is
    # (sync collective time of the sync run) - (sync collective time left in the overlap run)
    overlapped_sync = max(ls["sync_collective_s"] - lo["sync_collective_s"], 1e-12)
    P1 = rows["1proc"]["local_params"]
    Pt = rows["tp2"]["local_params"]

    def pred(P, zero, dp):
        # fp32: params 4P; Adam moments 8P (ZeRO >= 1: plus fp32 master copies, 12P / dp);
        # gradients after backward: 4P, or (ZeRO >= 1: reduced into this rank's partition at
        # the accumulation boundary) 4P / dp
        return {"params": 4 * P, "grads": 4 * P if zero == 0 else 4 * P // dp,
                "optimizer": 8 * P if zero == 0 else 12 * P // dp}
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
    except Exception:
        cpu = platform.processor()
    res = {
        "setup": {"model": "configs/default.yaml (hybrid 2-2-2-*-2-2-2-, d_model 96)", "vocab": V,
                  "global_batch": a.batch, "seq_len": a.seq, "timed_steps": a.steps, "warmup_steps": a.warmup,
                  "threads_per_rank": 1, "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                  "backend": "gloo", "load_avg_at_start": os.getloadavg()[0],
                  "note": "2 cores shared with other jobs: ranks contend for cores; ratios measured side by side"},
        "step_time": {k: {"step_s": rows[k]["step_s"], "vs_1proc": rows[k]["step_s"] / base,
                          "rounds_step_s": rows[k]["rounds_step_s"]} for k in ("1proc", "tp2", "dp2_zero2")},
        "ladder_tp2": {
            "note": "the three variants alternate step by step in one 2-rank run",
            "standard_step_s": rows["tp2_standard_i"]["step_s"], "ladder_sync_step_s": ls["step_s"],
            "ladder_overlap_step_s": lo["step_s"],
            "ladder_overlap_vs_standard": lo["step_s"] / rows["tp2_standard_i"]["step_s"],
            "ladder_overlap_vs_ladder_sync": lo["step_s"] / ls["step_s"],
            "overlapped_allreduce_sync_s": overlapped_sync, "overlap_exposed_wait_s": lo["exposed_wait_s"],
            "hidden_fraction": 1 - lo["exposed_wait_s"] / overlapped_sync},
        "comm_bytes_per_step_per_rank_tp2": {"predicted_from_plan": rows["tp2"]["bytes_predicted"],
                                             "counted": rows["tp2"]["bytes_counted"]},
        "memory_bytes_per_rank": {
            **{f"zero{z}_dp2": {"measured": rows[f"dp2_zero{z}"]["memory"], "predicted": pred(P1, z, 2)}
               for z in (0, 1, 2)},
            "tp2_zero0": {"measured": rows["tp2"]["memory"], "predicted": pred(Pt, 0, 1)}},
        "last_step_loss_rank0": {k: v["loss"] for k, v in rows.items()},
    }
    print(json.dumps(res, indent=2))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "distributed.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
