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
    python bench/distill.py --mode full --order mamba2_scratch,hybrid_scratch,mamba2_23 &  # a 2nd process

Prints one JSON object and writes bench/results/distill_<mode>.json;
`python bench/distill.py --table bench/results/distill_full.json` prints the README table.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/distill.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow
# the standard library's tokenize (imported by torch); the repository root replaces it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from seqlm.config import FromTeacherConfig, load_config, parse_config  # noqa: E402
from seqlm.distill.init import student_config  # noqa: E402
from seqlm.distill.runner import distill  # noqa: E402
from seqlm.train.loop import train  # noqa: E402
from seqlm.io import read_meta  # noqa: E402
from seqlm.io.checkpoint import CheckpointError  # noqa: E402

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


PLANS = {"mamba2_123": ("2-", "123"), "hybrid_123": ("2-*-", "123"), "mamba2_scratch": ("2-", None),
         "mamba2_3": ("2-", "3"), "mamba2_23": ("2-", "23"), "hybrid_scratch": ("2-*-", None)}


def targets(runs: dict) -> dict:
    out = {}
    if "teacher" in runs:
        for name, r in runs.items():
            if name != "teacher":
                r["gap_to_teacher"] = r["val_loss"] - runs["teacher"]["val_loss"]
    if "mamba2_123" in runs and "teacher" in runs:
        out["mamba2_within_0.05_of_teacher"] = runs["mamba2_123"]["gap_to_teacher"] <= 0.05
    if "mamba2_123" in runs and "mamba2_scratch" in runs:
        out["mamba2_distilled_beats_scratch"] = runs["mamba2_123"]["val_loss"] < runs["mamba2_scratch"]["val_loss"]
    if "mamba2_123" in runs and "hybrid_123" in runs and "teacher" in runs:
        out["hybrid_closer_than_mamba2"] = runs["hybrid_123"]["gap_to_teacher"] < runs["mamba2_123"]["gap_to_teacher"]
    return out


LABELS = {"teacher": "teacher (attention preset)", "mamba2_123": "Mamba-2, distilled 1+2+3",
          "mamba2_23": "Mamba-2, distilled 2+3", "mamba2_3": "Mamba-2, distilled 3 only",
          "mamba2_scratch": "Mamba-2, from scratch (CE)", "hybrid_123": "hybrid 50% attn, distilled 1+2+3",
          "hybrid_scratch": "hybrid 50% attn, from scratch (CE)"}


def table(res: dict) -> str:
    """The README table (markdown) from a results JSON."""
    tok = res["tokens_per_step"]
    rows = ["| run | steps | tokens | params | val loss | gap to teacher |", "|---|---|---|---|---|---|"]
    for name in ["teacher", "mamba2_123", "mamba2_23", "mamba2_3", "mamba2_scratch", "hybrid_123", "hybrid_scratch"]:
        r = res["runs"].get(name)
        if r is None:
            rows.append(f"| {LABELS[name]} | not run | | | | |")
            continue
        steps = res["teacher_steps"] if name == "teacher" else res["student_steps"]
        gap = "" if name == "teacher" else f"{r.get('gap_to_teacher', float('nan')):+.3f}"
        rows.append(f"| {LABELS[name]} | {steps} | {steps * tok / 1e6:.2f}M | {r['n_params'] / 1e3:.0f}k | "
                    f"{r['val_loss']:.3f} | {gap} |")
    return "\n".join(rows)


def main() -> int:
    if "--table" in sys.argv:
        print(table(json.loads(Path(sys.argv[sys.argv.index("--table") + 1]).read_text())))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["quick", "full"], default="quick")
    ap.add_argument("--teacher-steps", type=int, default=None, help="override (labelled as partial)")
    ap.add_argument("--fraction", type=float, default=0.2, help="student budget / teacher tokens")
    ap.add_argument("--out", default=None, help="work dir (default runs/bench_distill_<mode>)")
    ap.add_argument("--order", default=",".join(["teacher", *PLANS]),
                    help="runs in the order this process takes them. Several processes may share one work "
                         "dir: each run is claimed once (a .claim file), results merge into one JSON, and a "
                         "distilled run waits for the teacher")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out or ROOT / "runs" / f"bench_distill_{args.mode}")
    work.mkdir(parents=True, exist_ok=True)
    base = settings(args.mode, args.teacher_steps)
    base["data"]["files"] = [str(ROOT / "data" / "tinyshakespeare.txt")]
    tsteps = base["train"]["max_steps"]
    budget = max(10, round(args.fraction * tsteps))
    t0 = time.perf_counter()
    header = {"mode": args.mode, "partial": args.teacher_steps is not None,
              "cpu": cpu_model(), "threads": 1, "torch": torch.__version__,
              "teacher_steps": tsteps, "student_steps": budget,
              "tokens_per_step": base["train"]["batch_size"] * base["train"]["seq_len"],
              "stage_split": {"orient": MOHAWK_SPLIT[0], "align": MOHAWK_SPLIT[1]}}
    out_json = ROOT / "bench" / "results" / f"distill_{args.mode}.json"
    mine: dict = {}

    def save() -> dict:
        runs = {}
        if out_json.exists():
            old = json.loads(out_json.read_text())
            if all(old.get(k) == header[k] for k in ("mode", "teacher_steps", "student_steps")):
                runs = old.get("runs", {})
        runs.update(mine)
        res = {**header, "runs": runs, "targets": targets(runs)}
        res["wall_s_this_process"] = time.perf_counter() - t0
        out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, out_json)
        return res

    def claim(name: str) -> bool:
        try:
            os.close(os.open(work / f"{name}.claim", os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    tc = json.loads(json.dumps(base))
    tc["train"]["out_dir"] = str(work / "teacher")
    tck = work / "teacher" / "checkpoint"
    tcfg = parse_config(tc)

    def teacher_done() -> bool:  # the teacher's final checkpoint is complete (step directories + `latest`)
        try:
            return read_meta(tck).get("step") == tsteps
        except (OSError, CheckpointError):
            return False

    for name in args.order.split(","):
        if name != "teacher" and name not in PLANS:
            raise SystemExit(f"--order: unknown run {name!r}; known: teacher, {', '.join(PLANS)}")
        if not claim(name):
            continue
        t1 = time.perf_counter()
        d = json.loads(json.dumps(base))
        d["train"]["out_dir"] = str(work / name)
        if name == "teacher":
            r = train(tcfg)
            res = {"val_loss": r["val_loss"], "n_params": r["n_params"]}
        elif PLANS[name][1] is None:   # same architecture, fresh init, cross-entropy, same tokens
            smc, _ = student_config(tcfg.model, FromTeacherConfig(pattern=PLANS[name][0]))
            d["model"] = smc.model_dump(mode="json")
            d["train"].update(max_steps=budget, lr=2e-3, warmup_steps=max(1, budget // 20))
            r = train(parse_config(d))
            res = {"val_loss": r["val_loss"], "n_params": r["n_params"]}
        else:
            while not teacher_done():
                time.sleep(20)
            pattern, stages = PLANS[name]
            d["distill"] = {"teacher": str(tck), "from_teacher": {"pattern": pattern},
                            "stages": stage_steps(budget, stages), "kl_weight": 1.0, "ce_weight": 0.0}
            rep = distill(parse_config(d))
            res = {"val_loss": rep["student"]["val_loss"], "n_params": rep["student"]["n_params"],
                   "val_loss_init": rep["student"]["val_loss_init"], "teacher_val_loss_same_windows":
                   rep["teacher"]["val_loss"],
                   "stages": [{k: s[k] for k in ("kind", "steps", "first_loss", "final_loss", "val_loss_after")}
                              for s in rep["stages"]]}
        res["wall_s"] = time.perf_counter() - t1
        mine[name] = res
        print(f"{name}: val {res['val_loss']:.4f}", flush=True)
        save()
    print(json.dumps(save(), indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
