"""Build the model a RunConfig describes: the one factory that train, eval, convert and the
checkpoint loader use. It sits above model.py and memory/ so neither imports the other."""
from __future__ import annotations

from typing import Optional

from torch import nn

from seqlm.memory import HMT
from seqlm.model import LM


def build_model(cfg, vocab_size: Optional[int] = None) -> nn.Module:
    """An :class:`~seqlm.model.LM`, or the HMT wrapper around one when ``cfg.memory`` is set
    (same interface)."""
    mem = getattr(cfg, "memory", None)
    if mem is None:
        return LM(cfg.model, vocab_size)
    if mem.type == "hmt":
        return HMT(cfg.model, mem, vocab_size)
    raise ValueError(f"memory.type: unknown memory wrapper {mem.type!r}")  # pragma: no cover
