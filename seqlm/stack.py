"""The decoder stack: pre-norm residual layers, ``r = r + f_i(norm_i(r))``.

The stack is where topologies live; blocks never know about them:
- ``residual: ladder`` (Zhang et al.): sub-layer i reads the stream *without* sub-layer i-1's
  output, which is added one step late: ``out_i = f_i(norm_i(r)); r = r + out_{i-1}``; the
  stack returns ``r + out_last``. Forward, chunked prefill and step are position-wise the
  same recurrence, so they agree exactly.
- ``recursive`` (Relaxed Recursive, Bae et al.): K shared blocks, layer l runs block l mod K
  with depth l's own parameters swapped in (per-depth LoRA etc., seqlm/recursive.py).
It returns the residual stream; the model applies the final norm.
"""
from __future__ import annotations

import contextlib
import re

from torch import nn

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

    def _run(self, x, states, step: bool):
        new = None if states is None else list(states)
        prev = None  # ladder: the previous sub-layer's output, not yet in the stream
        pend = None  # parallel residual: the first output of the pair, added with the second
        for i in range(self.n_layers):
            norm, blk, ctx = self.layer(i)
            with ctx:
                if step:
                    out, new[i] = blk.step(norm(x), states[i])
                else:
                    out, s = blk(norm(x), None if states is None else states[i])
                    if new is not None:
                        new[i] = s
            if not step:
                out = self.drop(out)
            if self.ladder:
                x, prev = (x if prev is None else x + prev), out
            elif self.parallel:
                if pend is None:
                    pend = out
                else:
                    x, pend = x + pend + out, None
            else:
                x = x + out
        if prev is not None:
            x = x + prev
        return x, new

    def forward(self, x, states=None):
        return self._run(x, states, step=False)

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
