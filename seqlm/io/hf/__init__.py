"""Hugging Face interop: import a local transformers model directory into seqlm, export a
seqlm model to a directory transformers loads. One module per architecture family; nothing
here needs transformers itself (config.json and safetensors are read and written directly),
and nothing reaches a hub.

    import_hf(src) -> (model, RunConfig, tokenizer)      # seqlm.io.resolve.load_any uses it
    export_hf(model, cfg, tok, out)                        # seqlm convert to-hf
"""
from __future__ import annotations

from pathlib import Path

import torch

from seqlm.io.checkpoint import CheckpointError
from seqlm.io.hf import gpt2, llama, mamba, neox, nemotron_h
from seqlm.io.hf.common import UnsupportedHF, read_config, read_weights, write_hf_dir
from seqlm.io.hf.tokenizer import hf_tokenizer_files, load_hf_tokenizer

FAMILIES = {t: m for m in (llama, gpt2, neox, mamba, nemotron_h) for t in m.MODEL_TYPES}

__all__ = ["import_hf", "export_hf", "UnsupportedHF", "FAMILIES", "to_seqlm_state"]


def to_seqlm_state(src):
    """(hf config, seqlm model-config dict, seqlm state dict) of a HF directory."""
    src = Path(src)
    hc = read_config(src)
    fam = FAMILIES.get(hc["model_type"])
    if fam is None:
        raise UnsupportedHF(f"{src}: config.json: model_type: {hc['model_type']!r} is not supported "
                            f"(supported: {sorted(FAMILIES)})")
    sd = read_weights(src)
    mcfg, out = fam.to_seqlm(hc, sd, src)
    left = sorted(sd)
    if left:
        raise UnsupportedHF(f"{src}: weights: tensors seqlm has no place for: {left[:8]}"
                            f"{' ...' if len(left) > 8 else ''}")
    return hc, mcfg, out


def import_hf(src, device="cpu", dtype=None):
    """A local Hugging Face model directory -> (LM, RunConfig, tokenizer), model in eval mode."""
    from seqlm.config import ConfigError, parse_config
    from seqlm.io.factory import build_model

    hc, mcfg, sd = to_seqlm_state(src)
    try:
        tok = load_hf_tokenizer(src, hc)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: tokenizer: {e}") from None
    ctx = hc.get("max_position_embeddings") or hc.get("n_positions") or 2048
    run = {"model": mcfg, "data": {"tokenizer": {"type": "hf" if tok.type == "hf" else tok.type,
                                                 "path": str(Path(src).resolve())}},
           "train": {"seq_len": int(min(ctx, 8192))}}
    if tok.type == "sentencepiece":
        run["data"]["tokenizer"]["path"] = str((Path(src) / "tokenizer.model").resolve())
    try:
        cfg = parse_config(run, f"{src} (converted config.json)")
    except ConfigError as e:
        raise UnsupportedHF(str(e)) from None
    with torch.device("meta"):
        model = build_model(cfg, tok.vocab_size)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:  # pragma: no cover - a converter bug, not a user error
        raise CheckpointError(f"{src}: conversion left missing {missing} / unexpected {unexpected}")
    if mcfg.get("tie_embeddings"):
        model.head.weight = model.embed.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), cfg, tok


def family_for(mcfg):
    """The transformers architecture a seqlm model config exports to."""
    types = {s.type for s in mcfg.layers}
    if types == {"mamba"}:
        return mamba
    if types == {"mamba2"}:
        return mamba
    if "mamba2" in types and types <= {"mamba2", "attention", "mlp"}:
        return nemotron_h
    if types <= {"attention", "mlp"}:
        if mcfg.pos_embedding == "learned":
            return gpt2
        if mcfg.norm == "layernorm":
            return neox
        return llama
    bad = sorted(types - {"attention", "mlp", "mamba", "mamba2"})
    raise UnsupportedHF(f"model.layers: no transformers architecture holds {bad or sorted(types)} layers "
                        "(exportable: attention+mlp, mamba, mamba2, mamba2+attention+mlp)")


def export_state(model, cfg, vocab_size: int, eos_id: int):
    """(hf config dict, hf state dict) of a seqlm LM."""
    if getattr(cfg, "memory", None) is not None:
        raise UnsupportedHF("memory: HMT models have no transformers equivalent; not exportable")
    mcfg = cfg.model
    fam = family_for(mcfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return fam.from_seqlm(mcfg, sd, vocab_size, eos_id)


def export_hf(model, cfg, tok, out) -> Path:
    """Write ``out``: config.json, model.safetensors, tokenizer files (where transformers has
    an equivalent tokenizer)."""
    model = getattr(model, "_orig_mod", model)
    hc, sd = export_state(model, cfg, model.vocab_size, tok.eos_id)
    hc.setdefault("transformers_version", "5.0.0")
    return write_hf_dir(out, hc, sd, hf_tokenizer_files(tok))
