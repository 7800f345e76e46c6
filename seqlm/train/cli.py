"""``seqlm train``: train from a YAML config with dotted overrides."""
from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path

# the default run (configs/default.yaml), shipped inside the package so that a non-editable
# install trains the documented model; tests/test_reliability.py checks the two copies agree
DEFAULT_CONFIG = Path(str(resources.files("seqlm") / "configs" / "default.yaml"))


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help=f"YAML run config (default: configs/default.yaml; with --resume and no "
                        f"--config: the checkpoint's own config)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (a step directory or a checkpoint root); alone: from "
                        "the newest checkpoint in <train.out_dir>/checkpoint, or start fresh when there "
                        "is none yet (so one command starts and restarts a preemptible job)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP optimizer steps and write a checkpoint (resume later)")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    # set by the `deepspeed` launcher (LOCAL_RANK is in the environment too)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.lr=3e-4 model.d_model=256")


def run_train(args) -> int:
    from seqlm.config import ConfigError, dump_config, load_config
    from seqlm.io.checkpoint import resolve_checkpoint
    from seqlm.fsutil import replace_file
    from seqlm.train.loop import train

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides = [args.resume, *args.overrides]  # `--resume train.lr=1e-4`: an override
        args.resume = True
    config = args.config
    if config is None and isinstance(args.resume, str):
        config = str(resolve_checkpoint(args.resume) / "config.yaml")
    if config is None:
        if not DEFAULT_CONFIG.is_file():  # pragma: no cover - a broken install
            raise ConfigError(f"the default config {str(DEFAULT_CONFIG)!r} is missing from the seqlm "
                              f"package; reinstall seqlm or pass --config")
        config = str(DEFAULT_CONFIG)
    cfg = load_config(config, args.overrides)
    if args.resume is True and args.config is None:
        from seqlm.io.checkpoint import find_checkpoint

        ck = find_checkpoint(Path(cfg.train.out_dir) / "checkpoint")
        if ck is not None and (ck / "config.yaml").exists():
            cfg = load_config(ck / "config.yaml", args.overrides)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "config.yaml", dump_config(cfg).encode())
    res = train(cfg, resume=args.resume, stop_at=args.stop_at)
    rc = {"SIGINT": 130, "SIGTERM": 143}.get(res.get("signal"), 0)
    if res.get("rank", 0) != 0:  # multi-rank run: rank 0 reports
        return rc
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))
        return rc
    print(f"parameters: {res['n_params']:,}   steps: {res['step']}   "
          f"wall: {res['wall_s']:.1f}s   throughput: {res['tokens_per_s']:,.0f} tokens/s")
    if res.get("stopped"):
        print(f"stopped at step {res['step']}; checkpoint: {res['checkpoint']}")
        return rc
    print(f"validation loss: {res['val_loss']:.4f}   perplexity: {res['val_ppl']:.3f}   "
          f"(bits/token {res['val_loss'] / math.log(2):.3f})")
    print(f"checkpoint: {res['checkpoint']}   logs: {out / 'metrics.jsonl'}, {out / 'loss.png'}")
    if res.get("sample"):
        print("----- sample -----")
        print(res["sample"])
        print("------------------")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    add_train_args(p)
    p.set_defaults(func=run_train)
