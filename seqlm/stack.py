"""The decoder stack: pre-norm residual layers, ``r = r + f_i(norm_i(r))``.

The stack is where topologies live; blocks never know about them:
- ``residual: ladder`` (Zhang et al.): sub-layer i reads the stream *without* sub-layer i-1's
  output, which is added one step late: ``out_i = f_i(norm_i(r)); r = r + out_{i-1}``; the
  stack returns ``r + out_last``. Forward, chunked prefill and step are position-wise the
  same recurrence, so they agree exactly.
- ``recursive`` (Relaxed Recursive, Bae et al.): K shared blocks, layer l runs block l mod K
  with depth l's own parameters swapped in (per-depth LoRA etc., seqlm/recursive.py).
It returns the residual stream; the model applies the final norm.

Activation checkpointing (``set_checkpointing``, train.activation_checkpointing) is also a
stack matter: in a stateless forward with gradients on, each layer (``layers``) or each run
of k consecutive layers (``every_k``) runs under ``torch.utils.checkpoint`` (non-reentrant):
only its input is kept and its forward is recomputed in backward, recursive depths inside
their ``use_depth`` context, ladder runs with their pending output. Blocks need no code for
it, and kernels with their own recompute (the SSM scans) compose with it.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqlm.config import ModelConfig
from seqlm.ops.norm import make_norm
from seqlm.registry import get_block


class Stack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        specs = cfg.layers or []
        self.n_layers = len(specs)
        self.ladder = cfg.residual == "ladder"
        self.parallel = cfg.parallel_residual  # pairs (2i, 2i+1) read the same stream
        self.norms = nn.ModuleList(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) for _ in specs)
        blocks = [get_block(s.type)(s, cfg.d_model) for s in specs]
        for b in blocks:
            b.init_weights(len(specs), cfg.init_std)
        self.groups = None
        if cfg.recursive is not None:
            from seqlm.recursive import share_blocks

            self.groups = cfg.recursive.groups
            self.blocks, self.depths = share_blocks(blocks, cfg.recursive)
        else:
            self.blocks = nn.ModuleList(blocks)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.ckpt_every = 0  # 0: no activation checkpointing; k: one checkpoint per k layers

    def set_checkpointing(self, mode: str = "none", k: int = 1) -> None:
        """``none`` | ``layers`` (each layer) | ``every_k`` (runs of ``k`` layers)."""
        if mode not in ("none", "layers", "every_k"):
            raise ValueError(f"activation_checkpointing: expected none, layers or every_k, got {mode!r}")
        if k < 1:
            raise ValueError(f"activation_checkpoint_k: must be >= 1, got {k}")
        self.ckpt_every = {"none": 0, "layers": 1}.get(mode, k)

    def __len__(self) -> int:
        return self.n_layers

    def layer(self, i: int):
        """(norm, block, context) of layer i; the context makes the block run as depth i."""
        if self.groups is None:
            return self.norms[i], self.blocks[i], contextlib.nullcontext()
        from seqlm.recursive import use_depth

        blk = self.blocks[i % self.groups]
        return self.norms[i], blk, use_depth(blk, self.depths[i])

    def init_state(self, batch, max_len, device=None, dtype=None):
        states = []
        for i in range(self.n_layers):
            _, blk, ctx = self.layer(i)
            with ctx:
                states.append(blk.init_state(batch, max_len, device, dtype))
        return states

    def _run(self, x, states, step: bool, seq_idx=None):
        new = None if states is None else list(states)
        prev = None  # ladder: the previous sub-layer's output, not yet in the stream
        for i in range(self.n_layers):
            norm, blk, ctx = self.layer(i)
            with ctx:
                if step:
                    out, new[i] = blk.step(norm(x), states[i])
                else:
                    st = None if states is None else states[i]
                    out, s = blk(norm(x), st) if seq_idx is None else blk(norm(x), st, seq_idx=seq_idx)
                    if new is not None:
                        new[i] = s
            if not step:
                out = self.drop(out)
            x, prev = self._add(x, prev, out)
        if prev is not None:
            x = x + prev
        return x, new

    def _add(self, x, prev, out):
        """The residual update of one layer: (stream, pending output). Ladder: the previous
        layer's output joins one layer late; parallel residual: the first output of a pair
        waits for the second (both read the same stream)."""
        if self.ladder:
            return (x if prev is None else x + prev), out
        if self.parallel:
            return (x, out) if prev is None else (x + prev + out, None)
        return x + out, None

    def _layers(self, i0, i1, x, prev, seq_idx):
        """Stateless layers i0..i1-1 (one checkpointed run)."""
        for i in range(i0, i1):
            norm, blk, ctx = self.layer(i)
            with ctx:
                out, _ = blk(norm(x), None) if seq_idx is None else blk(norm(x), None, seq_idx=seq_idx)
            x, prev = self._add(x, prev, self.drop(out))
        return x, prev

    def _run_checkpointed(self, x, seq_idx):
        prev = None
        for i0 in range(0, self.n_layers, self.ckpt_every):
            i1 = min(i0 + self.ckpt_every, self.n_layers)
            x, prev = checkpoint(self._layers, i0, i1, x, prev, seq_idx, use_reentrant=False)
        if prev is not None:
            x = x + prev
        return x, None

    def forward(self, x, states=None, seq_idx=None):
        """x (B, T, D) -> (residual stream (B, T, D), new states); ``seq_idx`` (B, T) marks the
        documents of a packed window (seqlm/ops/docs.py)."""
        if self.ckpt_every and states is None and torch.is_grad_enabled() and self.n_layers:
            return self._run_checkpointed(x, seq_idx)
        return self._run(x, states, step=False, seq_idx=seq_idx)

    def step(self, x, states):
        return self._run(x, states, step=True)

    def tp_plan(self, tp: int = 1) -> dict:
        """The blocks' plans prefixed with their position in the stack (recursive: the shared
        blocks' plans plus each depth's own parameters and LoRA, seqlm/recursive.py); the
        pre-norms are replicated."""
        plan = {r"norms\..*": "replicate"}
        for i, b in enumerate(self.blocks):
            for pat, kind in b.tp_plan(tp).items():
                plan[rf"blocks\.{i}\.(?:{pat})"] = kind
        if self.groups is not None:
            for i, d in enumerate(self.depths):
                plan.update(d.tp_plan(self.blocks[i % self.groups].tp_plan(tp), rf"depths\.{i}\."))
        return plan
