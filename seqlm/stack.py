"""The decoder stack: pre-norm residual layers, ``r = r + f_i(norm_i(r))``.

The stack is where topologies live (residual form, sharing); blocks never know about them.
It returns the residual stream; the model applies the final norm.
"""
from __future__ import annotations

from torch import nn

from seqlm.config import ModelConfig
from seqlm.ops.norm import make_norm
from seqlm.registry import get_block


class Stack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        specs = cfg.layers or []
        self.norms = nn.ModuleList(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) for _ in specs)
        self.blocks = nn.ModuleList(get_block(s.type)(s, cfg.d_model) for s in specs)
        for b in self.blocks:
            b.init_weights(len(specs), cfg.init_std)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def __len__(self) -> int:
        return len(self.blocks)

    def init_state(self, batch, max_len, device=None, dtype=None):
        return [b.init_state(batch, max_len, device, dtype) for b in self.blocks]

    def forward(self, x, states=None):
        new = None if states is None else list(states)
        for i, (norm, blk) in enumerate(zip(self.norms, self.blocks)):
            out, s = blk(norm(x), None if states is None else states[i])
            if new is not None:
                new[i] = s
            x = x + self.drop(out)
        return x, new

    def step(self, x, states):
        new = list(states)
        for i, (norm, blk) in enumerate(zip(self.norms, self.blocks)):
            out, new[i] = blk.step(norm(x), states[i])
            x = x + out
        return x, new

    def tp_plan(self) -> dict[str, str]:
        """The blocks' plans prefixed with their position in the stack."""
        plan = {}
        for i, b in enumerate(self.blocks):
            for pat, kind in b.tp_plan().items():
                plan[rf"blocks\.{i}\.{pat}"] = kind
        return plan
