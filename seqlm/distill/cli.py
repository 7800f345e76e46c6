"""``seqlm distill -c configs/distill/X.yaml [--resume] [--stop-at STAGE:STEP] [overrides]``;
on several ranks: ``deepspeed --num_gpus N -m seqlm.cli distill ...`` (or ``torchrun
--nproc_per_node N -m seqlm.cli distill ...``), rank 0 printing."""
from __future__ import annotations

import argparse
import json


def _stop_at(text: str):
    stage, sep, step = text.rpartition(":")
    if not sep or not stage or not step.isdigit() or int(step) < 1:
        raise argparse.ArgumentTypeError(f"expected STAGE:STEP (stage name or 1-based index), got {text!r}")
    return stage, int(step)


def run_distill(args) -> int:
    from seqlm.config import load_config
    from seqlm.distill.runner import distill

    cfg = load_config(args.config, args.overrides)
    rep = distill(cfg, resume=args.resume, stop_at=args.stop_at)
    if rep.get("rank", 0) != 0:  # a launched run: rank 0 reports
        return 0
    if rep.get("stopped"):
        print(f"stopped in stage {rep['stage']} at step {rep['step']}; checkpoint: {rep['checkpoint']} "
              f"(continue with --resume)")
    elif args.json:
        print(json.dumps(rep, indent=2))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher into a student (MOHAWK stages, logit KD)")
    p.add_argument("--config", "-c", required=True, help="YAML run config with a distill: section")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.out_dir: skip finished stages, resume the interrupted one")
    p.add_argument("--stop-at", type=_stop_at, default=None, metavar="STAGE:STEP",
                   help="stop in STAGE (name or 1-based index) after STEP steps, with a checkpoint")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    # set by the `deepspeed` launcher (LOCAL_RANK is in the environment too)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=run_distill)
