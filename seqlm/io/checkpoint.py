"""Checkpoints: a directory written atomically (temp dir + rename).

    <path>/config.yaml        the RunConfig (load -> dump -> load is equal)
    <path>/model.safetensors  weights (tied tensors stored once)
    <path>/tokenizer/         the tokenizer (Tokenizer.save)
    <path>/trainer.pt         optimizer, step, RNG and data-sampler states (training only)
    <path>/meta.json          step, metrics, parameter count, seqlm version

A crash mid-write leaves at most a ``.tmp-*`` directory beside the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

import seqlm
from seqlm.config import ConfigError, dump_config, load_config


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match the model/tokenizer."""


def save_checkpoint(path, model: torch.nn.Module, cfg, tokenizer, trainer_state: Optional[dict] = None,
                    meta: Optional[dict] = None) -> Path:
    """Write a checkpoint directory atomically; replaces an existing one at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.yaml").write_text(dump_config(cfg))
        _st_save_model(_unwrap(model), str(tmp / "model.safetensors"))
        tokenizer.save(tmp / "tokenizer")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        info = {"seqlm_version": seqlm.__version__,
                "n_params": sum(p.numel() for p in _unwrap(model).parameters()),
                "tokenizer_fingerprint": tokenizer.fingerprint(), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r}: no such directory")
    for f in ("config.yaml", "model.safetensors", "tokenizer"):
        if not (path / f).exists():
            raise CheckpointError(f"checkpoint {str(path)!r}: missing {f} (incomplete or not a seqlm checkpoint)")


def read_meta(path) -> dict[str, Any]:
    p = Path(path) / "meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


def load_weights(model: torch.nn.Module, path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load model.safetensors into ``model``; returns (missing, unexpected) when not strict."""
    path = Path(path)
    try:
        missing, unexpected = _st_load_model(_unwrap(model), str(path / "model.safetensors"), strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit the model: {e}") from None
    return list(missing), list(unexpected)


def load_model(path, device="cpu", overrides: list[str] = ()):
    """-> (model, cfg, tokenizer) from a checkpoint directory, model in eval mode."""
    from seqlm.data.tokenizers import load_tokenizer
    from seqlm.io.factory import build_model

    path = Path(path)
    _check_dir(path)
    try:
        cfg = load_config(path / "config.yaml", overrides)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None
    tok = load_tokenizer(path / "tokenizer")
    meta = read_meta(path)
    fp = meta.get("tokenizer_fingerprint")
    if fp is not None and fp != tok.fingerprint():
        raise CheckpointError(f"checkpoint {str(path)!r}: tokenizer/ does not match the one the model was trained with")
    model = build_model(cfg, tok.vocab_size)
    load_weights(model, path)
    return model.to(device).eval(), cfg, tok


def load_trainer_state(path) -> Optional[dict]:
    p = Path(path) / "trainer.pt"
    if not p.exists():
        return None
    return torch.load(p, map_location="cpu", weights_only=False)


def init_from_checkpoint(model: torch.nn.Module, path, verbose: bool = True) -> list[str]:
    """Load the weights of checkpoint ``path`` (a stage-1 HMT, or a plain LM) into ``model``
    (an HMT, typically stage 2). Every tensor in the file must fit the model; the model's
    parameters the file lacks must all be HMT parameters (``memory.*``): they keep their fresh
    initialisation and are returned (and printed). Anything else is a CheckpointError."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise CheckpointError(f"memory.init_from: no checkpoint at {str(path)!r} (model.safetensors missing)")
    missing, unexpected = load_weights(model, path, strict=False)
    backbone_missing = sorted(k for k in missing if not k.startswith("memory."))
    if unexpected or backbone_missing:
        parts = []
        if unexpected:
            parts.append(f"weights the model has no place for: {sorted(unexpected)}")
        if backbone_missing:
            parts.append(f"backbone weights missing from the file: {backbone_missing}")
        raise CheckpointError(f"memory.init_from {str(path)!r} does not fit this model: " + "; ".join(parts)
                              + " (is model: the same backbone as the checkpoint's?)")
    new = sorted(missing)
    if verbose:
        what = ", ".join(new) if new else "nothing"
        print(f"HMT: initialised from {path}; newly initialised: {what}")
    return new


def maybe_init_from(model, cfg) -> list[str]:
    """For the training loop, on a fresh (not resumed) run: apply ``memory.init_from`` if set.
    Returns the newly initialised parameter names (empty when nothing was loaded)."""
    mem = getattr(cfg, "memory", None)
    if mem is None or not mem.init_from:
        return []
    return init_from_checkpoint(model, mem.init_from)
