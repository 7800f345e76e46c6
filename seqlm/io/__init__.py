"""Model I/O: the build-from-config factory, checkpoints (read, write, partial init) and
conversions. Below train/ and eval/, above the model: both sides use it, it uses neither."""
from seqlm.io.checkpoint import (CheckpointError, find_checkpoint, init_from_checkpoint, load_model,
                                 load_weights, maybe_init_from, read_meta, resolve_checkpoint,
                                 save_checkpoint)
from seqlm.io.factory import build_model

__all__ = ["CheckpointError", "build_model", "init_from_checkpoint", "load_model", "load_weights",
           "maybe_init_from", "read_meta", "save_checkpoint", "find_checkpoint", "resolve_checkpoint"]
