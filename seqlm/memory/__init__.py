"""Memory wrappers around the LM (HMT). ``seqlm.io.build_model`` builds one when a config
has a ``memory`` section; ``seqlm.io.init_from_checkpoint`` loads a stage-1 model into it."""
from __future__ import annotations

from seqlm.memory.hmt import HMT
from seqlm.memory.recall import HMTMemory, recall_ref

__all__ = ["HMT", "HMTMemory", "recall_ref"]
