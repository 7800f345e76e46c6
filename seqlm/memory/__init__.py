"""Memory wrappers around the LM (HMT). ``build_model`` calls :func:`build_memory_model`
when a config has a ``memory`` section."""
from __future__ import annotations

from seqlm.memory.hmt import HMT
from seqlm.memory.recall import HMTMemory, init_from_checkpoint, recall_ref

__all__ = ["HMT", "HMTMemory", "build_memory_model", "init_from_checkpoint", "maybe_init_from", "recall_ref"]


def build_memory_model(model_cfg, memory_cfg, vocab_size=None):
    """The wrapper a MemoryConfig describes around the LM of ``model_cfg``."""
    if memory_cfg.type == "hmt":
        return HMT(model_cfg, memory_cfg, vocab_size)
    raise ValueError(f"memory.type: unknown memory wrapper {memory_cfg.type!r}")  # pragma: no cover


def maybe_init_from(model, cfg) -> list[str]:
    """For the training loop, on a fresh (not resumed) run: apply ``memory.init_from`` if set.
    Returns the newly initialised parameter names (empty when nothing was loaded)."""
    mem = getattr(cfg, "memory", None)
    if mem is None or not mem.init_from:
        return []
    return init_from_checkpoint(model, mem.init_from)
