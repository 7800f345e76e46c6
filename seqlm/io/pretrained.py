"""One way in for every model path: :func:`load_any` takes a seqlm checkpoint (a run's root,
a step directory, a ``save_pretrained`` directory) or a local Hugging Face model directory
(config.json with a ``model_type`` and no seqlm config.yaml) and returns (model, cfg,
tokenizer). The CLI's ``--checkpoint`` options, the lm-eval adapter and distillation teachers
all go through it; :func:`load` is the public ``seqlm.load``."""
from __future__ import annotations

from pathlib import Path

from seqlm.io.checkpoint import CheckpointError, load_model

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "fp64": "float64", "float64": "float64"}


def _dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")
    return getattr(torch, _DTYPES[str(dtype)])


def is_hf_dir(path) -> bool:
    """A local transformers model directory (config.json with model_type, no config.yaml)."""
    p = Path(path)
    if not p.is_dir() or (p / "config.yaml").exists() or not (p / "config.json").is_file():
        return False
    import json

    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_any(path, device="cpu", dtype=None, overrides=()):
    """-> (model, RunConfig, tokenizer), model in eval mode, from a seqlm checkpoint or a local
    Hugging Face model directory (converted in memory; ``seqlm convert from-hf`` saves it)."""
    p = Path(path).expanduser()
    dt = _dtype(dtype)
    if is_hf_dir(p):
        if overrides:
            raise CheckpointError(f"{str(p)!r}: config overrides apply to seqlm checkpoints, not HF directories")
        from seqlm.io.hf import import_hf

        return import_hf(p, device=device, dtype=dt)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").exists():
        raise CheckpointError(f"{str(p)!r}: config.json has no model_type (not a transformers model directory)")
    model, cfg, tok = load_model(p, device, overrides)
    if dt is not None:
        model = model.to(dt)
    return model, cfg, tok


def load(path, device="cpu", dtype=None):
    """``seqlm.load``: (model, tokenizer) from a seqlm checkpoint / pretrained directory or a
    local Hugging Face model directory."""
    model, _, tok = load_any(path, device=device, dtype=dtype)
    return model, tok


def save_pretrained(model, directory, tokenizer, run_config=None, metrics=None) -> Path:
    """A self-contained model directory for any seqlm model (an HMT included): a model-only
    checkpoint (:func:`seqlm.io.checkpoint.save_checkpoint`: config, safetensors weights,
    tokenizer, SHA-256 manifest, crash-safe) plus a README.md model card with the config and
    ``metrics``. ``LM.save_pretrained`` writes the same layout from the model layer."""
    from seqlm.config import RunConfig, dump_config
    from seqlm.data.tokenizer_base import _atomic_write
    from seqlm.io.checkpoint import save_checkpoint
    from seqlm.model_card import model_card

    model = getattr(model, "_orig_mod", model)
    cfg = run_config if run_config is not None else RunConfig(model=model.cfg)
    meta = {"vocab_size": model.vocab_size, "metrics": metrics or {}}
    path = save_checkpoint(directory, model, cfg, tokenizer, meta=meta)
    n = sum(p.numel() for p in model.parameters())
    _atomic_write(Path(path) / "README.md", model_card(dump_config(cfg), n, metrics, tokenizer).encode())
    return Path(path)
