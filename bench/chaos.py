#!/usr/bin/env python
"""Chaos test of training: kill ``seqlm train --resume`` again and again, check it ends
bit-identical to an uninterrupted run (CPU, fp32).

    nice -n 10 python bench/chaos.py [--steps 60] [--every 5] [--random-kills 8] [--seed 0]

1. An uninterrupted reference run (a subprocess of the real CLI).
2. Deterministic kills: the same command with ``SEQLM_FAULT_AT=k`` (seqlm/io/fsutil.py), which
   SIGKILLs the process right before its k-th file-system step of a checkpoint save (every
   write, fsync, rename and removal in turn: k = 1 .. steps of one save + a prune), each
   followed by the check that the newest checkpoint loads and verifies.
3. Random kills: SIGKILL after a random delay (also while checkpoints are written).
4. SIGINT and SIGTERM at random moments (checkpoint at the next step boundary, exit 130/143).
5. The final ``--resume`` runs to the end; its weights, optimizer state and logged losses
   must equal the reference's bit for bit.

Prints JSON and writes bench/results/chaos.json (CPU model, threads, torch version).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ itself must not shadow the standard library (bench/tokenize.py would hide `tokenize`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402

TEXT = "".join(f"line {i}: how vexingly quick daft zebras jump, said the {i % 7}th fox.\n" for i in range(2000))


def write_config(work: Path, name: str, steps: int, every: int) -> Path:
    from seqlm.config import parse_config, save_config

    cfg = parse_config({
        "model": {"d_model": 32, "pattern": "2*-M-", "dropout": 0.1,
                  "block_defaults": {"attention": {"n_heads": 2}, "mamba2": {"d_state": 8, "head_dim": 8}}},
        "data": {"files": [str(work / "corpus.txt")], "cache_dir": str(work / "cache")},
        "train": {"seq_len": 32, "batch_size": 4, "grad_accum": 2, "max_steps": steps, "lr": 3e-3,
                  "warmup_steps": 5, "threads": 1, "dtype": "fp32", "checkpoint_every": every, "keep_last": 2,
                  "out_dir": str(work / name), "log_every": 1, "progress": False},
        "eval": {"every": 0, "batches": 2, "sample_tokens": 0},
    })
    path = work / f"{name}.yaml"
    save_config(cfg, path)
    return path


def run(cfg: Path, env_extra=None, kill_after=None, sig=signal.SIGKILL, extra=()) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "seqlm.cli", "train", "--config", str(cfg), *extra, "--resume"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
    p.wait()
    return p.returncode


def check_loadable(root: Path) -> bool:
    from seqlm.io import checkpoint as ck

    d = ck.find_checkpoint(root)
    if d is None:
        return True  # nothing saved yet: resume starts fresh
    ck.load_model(d)
    st = ck.load_trainer_state(d)
    assert st["step"] == ck.read_meta(d)["step"]
    visible = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    assert all(n == "latest" or n.startswith("step-") for n in visible), visible
    return True


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from seqlm.io import checkpoint as ck

    da, db = ck.resolve_checkpoint(a / "checkpoint"), ck.resolve_checkpoint(b / "checkpoint")
    out = {}
    for f in ("model.safetensors", "trainer.safetensors"):
        ta, tb = load_file(str(da / f)), load_file(str(db / f))
        out[f] = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    def losses(d):
        recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    out["losses"] = losses(a) == losses(b)
    out["final_step"] = ck.read_meta(db)["step"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--random-kills", type=int, default=8)
    ap.add_argument("--signals", type=int, default=4, help="SIGINT/SIGTERM interruptions")
    ap.add_argument("--fault-stride", type=int, default=1,
                    help="kill at every n-th file-system step only (1: every step; a loaded machine may need 2-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="seqlm-chaos-"))
    (work / "corpus.txt").write_text(TEXT)
    t0 = time.time()
    ref_cfg, cfg = write_config(work, "ref", args.steps, args.every), write_config(work, "chaos", args.steps, args.every)
    assert run(ref_cfg) == 0
    ref_s = time.time() - t0
    # the file-system steps of a resumed process up to the end of its first save (the out_dir
    # config.yaml, the step directory, `latest`, pruning): traced on a probe run
    trace = work / "trace.txt"
    probe = write_config(work, "probe", 2 * args.every, args.every)
    assert run(probe) == 0
    assert run(probe, {"SEQLM_FAULT_TRACE": str(trace)}, extra=[f"train.max_steps={3 * args.every}"]) == 0
    ops = trace.read_text().splitlines()
    last = max(i for i, ln in enumerate(ops) if " remove " in ln)
    ops = ops[: last + 1]
    n_points = len(ops)
    log, kills, signals_ = [], 0, 0
    root = work / "chaos" / "checkpoint"
    # 2. every file-system step in turn (the k-th step of the process, k = 1..n_points)
    for k in range(1, n_points + 1, args.fault_stride):
        rc = run(cfg, {"SEQLM_FAULT_AT": str(k)})
        killed = rc == -signal.SIGKILL
        kills += killed
        log.append({"kind": "fault", "at": k, "op": ops[k - 1].split(" ", 1)[1].replace(str(work), ""),
                    "rc": rc, "loadable": check_loadable(root)})
    # 3. random SIGKILLs; 4. SIGINT / SIGTERM
    plan = [("kill", signal.SIGKILL)] * args.random_kills + [("signal", rng.choice([signal.SIGINT, signal.SIGTERM]))
                                                             for _ in range(args.signals)]
    rng.shuffle(plan)
    for kind, sig in plan:
        delay = rng.uniform(0.5, max(1.0, ref_s * 0.6))
        rc = run(cfg, kill_after=delay, sig=sig)
        kills += rc == -signal.SIGKILL
        signals_ += rc in (130, 143)
        log.append({"kind": kind, "signal": sig.name, "after_s": round(delay, 2), "rc": rc,
                    "loadable": check_loadable(root)})
    final_rc = run(cfg)
    res = compare(work / "ref", work / "chaos")
    import torch

    out = {"bench": "chaos", "cpu": cpu_model(), "threads": 1, "torch": torch.__version__,
           "steps": args.steps, "checkpoint_every": args.every, "kill_points_traced": n_points,
           "kill_points_tried": len([e for e in log if e["kind"] == "fault"]),
           "kill_point_kinds": sorted({e["op"].split()[0] for e in log if e["kind"] == "fault"}), "sigkills": kills, "sigint_sigterm_stops": signals_,
           "final_rc": final_rc, "bit_identical_weights": res["model.safetensors"],
           "bit_identical_optimizer": res["trainer.safetensors"], "identical_losses": res["losses"],
           "final_step": res["final_step"], "every_kill_left_a_loadable_checkpoint": all(e["loadable"] for e in log),
           "wall_s": round(time.time() - t0, 1), "events": log}
    print(json.dumps({k: v for k, v in out.items() if k != "events"}, indent=2))
    dest = ROOT / "bench" / "results" / "chaos.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = final_rc == 0 and res["model.safetensors"] and res["trainer.safetensors"] and res["losses"]
    return 0 if ok and kills >= 5 else 1


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    sys.exit(main())
