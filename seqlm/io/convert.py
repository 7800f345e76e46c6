"""Conversions between topologies (``seqlm convert ...``), on models and on checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from seqlm.config import parse_config
from seqlm.io.checkpoint import CheckpointError, read_meta, resolve_checkpoint, save_checkpoint
from seqlm.io.factory import build_model
from seqlm.recursive import fill_from_unshared


def convert_recursive(model: nn.Module, cfg, groups: int, rank: int, init: str = "average",
                  alpha: Optional[float] = None):
    """An unshared model (LM or HMT) and its RunConfig -> (recursive model, new RunConfig)."""
    if cfg.model.recursive is not None:
        raise ValueError("--checkpoint: the model is already recursive (model.recursive is set)")
    data = cfg.model_dump(mode="json")
    data["model"]["recursive"] = {"groups": groups, "lora_rank": rank, "lora_alpha": alpha, "init": init}
    new_cfg = parse_config(data, "<converted config>")
    new = build_model(new_cfg, model.vocab_size).to(next(model.parameters()).dtype)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("stack.blocks.")}
    missing, unexpected = new.load_state_dict(sd, strict=False)
    left = [k for k in missing if not k.startswith(("stack.blocks.", "stack.depths."))]
    if left or unexpected:  # pragma: no cover - the two models share everything outside the blocks
        raise ValueError(f"conversion: unmatched parameters {left + list(unexpected)}")
    fill_from_unshared(new.stack, list(model.stack.blocks), init)
    return new, new_cfg


def convert_checkpoint(checkpoint, out, groups: int, rank: int, init: str = "average",
                       alpha: Optional[float] = None) -> dict:
    """``seqlm convert recursive``: load, convert, print parameter counts, save to ``out``."""
    if groups <= 0:
        raise ValueError(f"--groups: must be > 0, got {groups}")
    if rank < 0:
        raise ValueError(f"--rank: must be >= 0, got {rank}")
    from seqlm.io.pretrained import is_hf_dir, load_any

    src, dst = Path(checkpoint).resolve(), Path(out).resolve()
    used = {src} if is_hf_dir(checkpoint) else {src, resolve_checkpoint(checkpoint).resolve()}
    for s in used:  # never replace (or write inside / around) the input
        if dst == s or s in dst.parents or dst in s.parents:
            raise CheckpointError(f"--out {str(out)!r} overlaps the input checkpoint {str(checkpoint)!r}; "
                                  f"choose another directory")
    model, cfg, tok = load_any(checkpoint)
    new, new_cfg = convert_recursive(model, cfg, groups, rank, init, alpha)
    before, after = model.num_params(), new.num_params()
    stack_before = sum(p.numel() for p in model.stack.parameters())
    stack_after = sum(p.numel() for p in new.stack.parameters())
    print(f"parameters before: {before:,} (stack {stack_before:,})")
    print(f"parameters after:  {after:,} (stack {stack_after:,}; {groups} shared blocks, LoRA rank {rank}) "
          f"= {100 * after / before:.1f}%")
    meta = {"converted_from": str(Path(checkpoint)), "conversion": "recursive",
            "source_step": None if is_hf_dir(checkpoint) else read_meta(checkpoint).get("step")}
    path = save_checkpoint(out, new, new_cfg, tok, meta=meta)
    print(f"wrote {path}")
    return {"params_before": before, "params_after": after, "checkpoint": str(path)}


def convert_from_hf(src, out) -> dict:
    """``seqlm convert from-hf``: a local Hugging Face model directory -> a seqlm model
    directory (config.yaml, model.safetensors, tokenizer/, model card; see LM.save_pretrained)."""
    from seqlm.io.hf import import_hf
    from seqlm.io.pretrained import is_hf_dir, save_pretrained

    if not is_hf_dir(src):
        raise ValueError(f"--src: {str(src)!r} is not a Hugging Face model directory (config.json with model_type)")
    model, cfg, tok = import_hf(src)
    path = save_pretrained(model, out, tok, cfg, metrics=None)
    print(f"converted {src} ({model.num_params():,} parameters, layers "
          f"{''.join(_CHARS.get(s.type, '?') for s in cfg.model.layers)!r}) -> {path}")
    return {"checkpoint": str(path), "n_params": model.num_params()}


def convert_to_hf(checkpoint, out) -> dict:
    """``seqlm convert to-hf``: a seqlm checkpoint -> a directory transformers loads
    (AutoModelForCausalLM.from_pretrained(out)); stacks without an equivalent are refused."""
    from seqlm.io.hf import export_hf
    from seqlm.io.pretrained import load_any

    model, cfg, tok = load_any(checkpoint)
    path = export_hf(model, cfg, tok, out)
    import json

    kind = json.loads((path / "config.json").read_text())["model_type"]
    print(f"exported {checkpoint} as {kind} -> {path}")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        print(f"note: the {tok.type} tokenizer has no transformers equivalent; no tokenizer files written "
              f"(ids: see the seqlm checkpoint's tokenizer/)")
    return {"out": str(path), "model_type": kind}


_CHARS = {"attention": "*", "mlp": "-", "mamba": "M", "mamba2": "2", "h3": "H"}
