#!/usr/bin/env python
"""Issue 14 benchmark: distilling seqlm's attention preset into Mamba-2 and a hybrid (MOHAWK).

One process, side by side, same data, same validation windows:
  teacher    the attention preset (configs/attention.yaml) trained on char-level Tiny
             Shakespeare for 2x the nanoGPT budget (full: 4000 steps x 12 x 64 tokens)
  students   pure Mamba-2 (`2-`) and a 50%-attention hybrid (`2-*-`) initialised from the
             teacher (Mamba-in-the-Llama mapping) and distilled through stages 1+2+3;
             the same two architectures trained from scratch on cross-entropy;
             stage ablations of the Mamba-2 student: 3 only, 2+3 (and 1+2+3 above).
  budget     every student gets 20% of the teacher's training tokens, split across stages
             as MOHAWK does (stage 1 ~3%, stage 2 ~5%, stage 3 the rest); an ablation that
             drops a stage gives its tokens to stage 3. Scratch students train on the same
             number of tokens.
Targets: distilled Mamba-2 within 0.05 of the teacher's val loss and better than scratch
Mamba-2; the hybrid closer to the teacher than pure Mamba-2.

    python bench/distill.py --mode quick     # a few CPU minutes: shrunk teacher and budgets
    python bench/distill.py --mode full      # the issue's setting
    python bench/distill.py --mode full --teacher-steps 1000   # a labelled partial run

Prints one JSON object and writes bench/results/distill_<mode>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqlm.config import FromTeacherConfig, load_config, parse_config  # noqa: E402
from seqlm.distill.init import student_config  # noqa: E402
from seqlm.distill.runner import distill  # noqa: E402
from seqlm.train.loop import train  # noqa: E402

MOHAWK_SPLIT = (0.03, 0.05)   # stage 1, stage 2 fractions; stage 3 takes the rest


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        return platform.processor() or "?"


def settings(mode: str, teacher_steps=None):
    base = load_config(ROOT / "configs" / "attention.yaml").model_dump(mode="json")
    if mode == "quick":
        base["model"].update(d_model=64, n_layers=4, layers=base["model"]["layers"][:4])
        base["train"].update(max_steps=teacher_steps or 400, batch_size=8, seq_len=64, warmup_steps=30, lr=2e-3)
        base["eval"].update(batches=10)
    else:
        base["train"]["max_steps"] = teacher_steps or 4000   # 2x the nanoGPT budget (2000 steps)
        base["eval"].update(batches=40)
    base["eval"].update(every=0, sample_tokens=0)
    base["train"].update(progress=False, log_every=25, threads=1)
    return base


def stage_steps(total: int, stages: str) -> list[dict]:
    s1 = max(1, round(MOHAWK_SPLIT[0] * total))
    s2 = max(1, round(MOHAWK_SPLIT[1] * total))
    out = []
    if "1" in stages:
        out.append({"kind": "orient", "steps": s1, "lr": 1e-2, "warmup_steps": 2})
    if "2" in stages:
        out.append({"kind": "align", "steps": s2, "lr": 3e-3, "warmup_steps": 2})
    used = sum(s["steps"] for s in out)
    out.append({"kind": "logits", "steps": total - used, "lr": 1e-3, "warmup_steps": max(1, (total - used) // 40)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["quick", "full"], default="quick")
    ap.add_argument("--teacher-steps", type=int, default=None, help="override (labelled as partial)")
    ap.add_argument("--fraction", type=float, default=0.2, help="student budget / teacher tokens")
    ap.add_argument("--out", default=None, help="work dir (default runs/bench_distill_<mode>)")
    ap.add_argument("--only", default=None, help="comma list of runs to do (for partial runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out or ROOT / "runs" / f"bench_distill_{args.mode}")
    work.mkdir(parents=True, exist_ok=True)
    base = settings(args.mode, args.teacher_steps)
    base["data"]["files"] = [str(ROOT / "data" / "tinyshakespeare.txt")]
    tsteps = base["train"]["max_steps"]
    budget = max(10, round(args.fraction * tsteps))
    t0 = time.perf_counter()
    results: dict = {"mode": args.mode, "partial": args.teacher_steps is not None or args.only is not None,
                     "cpu": cpu_model(), "threads": 1, "torch": torch.__version__,
                     "teacher_steps": tsteps, "student_steps": budget,
                     "tokens_per_step": base["train"]["batch_size"] * base["train"]["seq_len"],
                     "stage_split": {"orient": MOHAWK_SPLIT[0], "align": MOHAWK_SPLIT[1]}, "runs": {}}
    out_json = ROOT / "bench" / "results" / f"distill_{args.mode}.json"

    def save():
        results["wall_s"] = time.perf_counter() - t0
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2))

    # teacher
    tc = json.loads(json.dumps(base))
    tc["train"]["out_dir"] = str(work / "teacher")
    tck = work / "teacher" / "checkpoint"
    if (tck / "meta.json").exists() and json.loads((tck / "meta.json").read_text()).get("step") == tsteps:
        meta = json.loads((tck / "meta.json").read_text())
        tres = {"val_loss": meta["val_loss"], "n_params": meta["n_params"], "reused": True}
    else:
        t1 = time.perf_counter()
        r = train(parse_config(tc))
        tres = {"val_loss": r["val_loss"], "n_params": r["n_params"], "wall_s": time.perf_counter() - t1}
    results["runs"]["teacher"] = tres
    print(f"teacher: val {tres['val_loss']:.4f}", flush=True)
    save()

    tcfg = parse_config(tc)
    plans = {"mamba2_123": ("2-", "123"), "hybrid_123": ("2-*-", "123"), "mamba2_23": ("2-", "23"),
             "mamba2_3": ("2-", "3"), "mamba2_scratch": ("2-", None), "hybrid_scratch": ("2-*-", None)}
    only = set(args.only.split(",")) if args.only else None
    for name, (pattern, stages) in plans.items():
        if only and name not in only:
            continue
        t1 = time.perf_counter()
        d = json.loads(json.dumps(base))
        d["train"]["out_dir"] = str(work / name)
        if stages is None:   # same architecture, fresh init, cross-entropy, same tokens
            smc, _ = student_config(tcfg.model, FromTeacherConfig(pattern=pattern))
            d["model"] = smc.model_dump(mode="json")
            d["train"].update(max_steps=budget, lr=2e-3, warmup_steps=max(1, budget // 20))
            r = train(parse_config(d))
            res = {"val_loss": r["val_loss"], "n_params": r["n_params"]}
        else:
            d["distill"] = {"teacher": str(tck), "from_teacher": {"pattern": pattern},
                            "stages": stage_steps(budget, stages), "kl_weight": 1.0, "ce_weight": 0.0}
            rep = distill(parse_config(d))
            res = {"val_loss": rep["student"]["val_loss"], "n_params": rep["student"]["n_params"],
                   "val_loss_init": rep["student"]["val_loss_init"],
                   "stages": [{k: s[k] for k in ("kind", "steps", "first_loss", "final_loss", "val_loss_after")}
                              for s in rep["stages"]]}
        res["gap_to_teacher"] = res["val_loss"] - tres["val_loss"]
        res["wall_s"] = time.perf_counter() - t1
        results["runs"][name] = res
        print(f"{name}: val {res['val_loss']:.4f} (gap {res['gap_to_teacher']:+.4f})", flush=True)
        save()

    R = results["runs"]
    tgt = {}
    if "mamba2_123" in R:
        tgt["mamba2_within_0.05_of_teacher"] = R["mamba2_123"]["gap_to_teacher"] <= 0.05
    if "mamba2_123" in R and "mamba2_scratch" in R:
        tgt["mamba2_distilled_beats_scratch"] = R["mamba2_123"]["val_loss"] < R["mamba2_scratch"]["val_loss"]
    if "mamba2_123" in R and "hybrid_123" in R:
        tgt["hybrid_closer_than_mamba2"] = R["hybrid_123"]["gap_to_teacher"] < R["mamba2_123"]["gap_to_teacher"]
    results["targets"] = tgt
    save()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
