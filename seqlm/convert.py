"""``seqlm convert ...``: checkpoint conversions.

    seqlm convert recursive --checkpoint C --groups K --rank r --out DIR
"""
from __future__ import annotations


def run_recursive(args) -> int:
    from seqlm.io.convert import convert_checkpoint  # noqa: WPS433 (heavy import on demand)

    convert_checkpoint(args.checkpoint, args.out, groups=args.groups, rank=args.rank, init=args.init)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between topologies")
    csub = p.add_subparsers(dest="convert_command", metavar="KIND")
    csub.required = True
    r = csub.add_parser("recursive", help="unshared model -> relaxed recursive (shared blocks + per-depth LoRA)")
    r.add_argument("--checkpoint", required=True, help="trained unshared checkpoint directory")
    r.add_argument("--groups", type=int, required=True, help="K unique blocks; layer l uses block l mod K")
    r.add_argument("--rank", type=int, required=True, help="LoRA rank per depth (0 = pure tying)")
    r.add_argument("--init", choices=["average", "first"], default="average",
                   help="shared weight initialisation from the tied layers")
    r.add_argument("--out", required=True, help="output checkpoint directory")
    r.set_defaults(func=run_recursive)
