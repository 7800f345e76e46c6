"""``seqlm convert ...``: checkpoint conversions.

    seqlm convert recursive --checkpoint C --groups K --rank r --out DIR
    seqlm convert from-hf --src HF_DIR --out DIR
    seqlm convert to-hf --checkpoint C --out HF_DIR
"""
from __future__ import annotations


def run_recursive(args) -> int:
    from seqlm.io.convert import convert_checkpoint  # noqa: WPS433 (heavy import on demand)

    convert_checkpoint(args.checkpoint, args.out, groups=args.groups, rank=args.rank, init=args.init)
    return 0


def run_from_hf(args) -> int:
    from seqlm.io.convert import convert_from_hf

    convert_from_hf(args.src, args.out)
    return 0


def run_to_hf(args) -> int:
    from seqlm.io.convert import convert_to_hf

    convert_to_hf(args.checkpoint, args.out)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between topologies")
    csub = p.add_subparsers(dest="convert_command", metavar="KIND")
    csub.required = True
    r = csub.add_parser("recursive", help="unshared model -> relaxed recursive (shared blocks + per-depth LoRA)")
    r.add_argument("--checkpoint", required=True, help="trained unshared checkpoint directory (or a Hugging Face model directory)")
    r.add_argument("--groups", type=int, required=True, help="K unique blocks; layer l uses block l mod K")
    r.add_argument("--rank", type=int, required=True, help="LoRA rank per depth (0 = pure tying)")
    r.add_argument("--init", choices=["average", "first"], default="average",
                   help="shared weight initialisation from the tied layers")
    r.add_argument("--out", required=True, help="output checkpoint directory")
    r.set_defaults(func=run_recursive)
    f = csub.add_parser("from-hf", help="local Hugging Face model directory -> seqlm model directory "
                        "(llama, mistral, gpt2, gpt_neox, mamba, mamba2, nemotron_h)")
    f.add_argument("--src", required=True, help="directory with config.json, *.safetensors or *.bin, tokenizer files")
    f.add_argument("--out", required=True, help="output seqlm model directory")
    f.set_defaults(func=run_from_hf)
    t = csub.add_parser("to-hf", help="seqlm checkpoint -> directory transformers loads (Llama, Mistral, GPT-2, "
                        "GPT-NeoX, Mamba, Mamba-2 or Nemotron-H format, chosen from the layers)")
    t.add_argument("--checkpoint", required=True, help="seqlm checkpoint (or a Hugging Face directory)")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(func=run_to_hf)
