"""Run task specs: train-on-task (eval/mqar.yaml) or checkpoint evaluations
(eval/checkpoint_tasks.yaml).

    python eval/run_tasks.py eval/mqar.yaml [--quick] [--out eval/results/mqar.json]
    python eval/run_tasks.py eval/checkpoint_tasks.yaml --checkpoint runs/x/checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_train_spec(spec: dict, quick: bool, device: str) -> dict:
    from seqlm.eval.tasks.mqar import MQARSpec
    from seqlm.eval.tasks.train_task import train_mqar

    if spec.get("task") != "mqar":
        raise ValueError(f"task: only mqar specs are trained by this runner, got {spec.get('task')!r}")
    s = {**spec, **(spec.get("quick") or {})} if quick else spec
    rows = []
    for mixer in s["mixers"]:
        for d in s["widths"]:
            for L, k in s["settings"]:
                try:
                    r = train_mqar(MQARSpec(L, k, s["vocab_size"]), mixer, d, n_train=s["n_train"],
                                   n_test=s["n_test"], lrs=s["lrs"], steps=s["steps"],
                                   batch_size=s.get("batch_size", 64), device=device)
                except KeyError as e:
                    rows.append({"mixer": mixer, "d_model": d, "seq_len": L, "num_pairs": k, "skipped": str(e)})
                    continue
                rows.append({"mixer": mixer, "d_model": d, "seq_len": L, "num_pairs": k,
                             "accuracy": r["accuracy"], "best_lr": r["best_lr"]})
                print(json.dumps(rows[-1]), file=sys.stderr)
    return {"task": "mqar", "quick": quick, "spec": s, "results": rows}


def run_checkpoint_spec(spec: dict, checkpoint: str, out: str | None) -> dict:
    from seqlm.cli import main

    codes = {}
    for t in spec["tasks"]:
        argv = ["eval", t["task"], "--checkpoint", checkpoint, *map(str, t.get("args", []))]
        if out:
            argv += ["--out", out]
        codes[t["task"]] = main(argv)
    return {"return_codes": codes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run eval/ task specs")
    ap.add_argument("spec")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    spec = yaml.safe_load(Path(a.spec).read_text())
    if "tasks" in spec:
        if not a.checkpoint:
            raise SystemExit(f"{a.spec}: checkpoint task specs need --checkpoint")
        res = run_checkpoint_spec(spec, a.checkpoint, a.out)
    else:
        res = run_train_spec(spec, a.quick, a.device)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0 if all(v == 0 for v in res.get("return_codes", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
