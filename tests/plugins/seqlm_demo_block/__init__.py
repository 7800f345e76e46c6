"""An out-of-tree seqlm block, registered through the ``seqlm.blocks`` entry point group of the
dist-info beside it (tests/test_plugins.py puts this folder on sys.path; seqlm never imports it
by name). A causal token shift: y_t = out(silu(a(x_t) + b(x_{t-1}))); state: the last input."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from seqlm.blocks.base import Block, BlockConfig
from seqlm.registry import register


class DemoShiftConfig(BlockConfig):
    type: Literal["demo_shift"] = "demo_shift"
    hidden: int = Field(16, gt=0, description="Inner width.")


@register("demo_shift", char="~")
class DemoShift(Block):
    Config = DemoShiftConfig

    def __init__(self, cfg: DemoShiftConfig, d_model: int):
        super().__init__(cfg, d_model)
        self.a = nn.Linear(d_model, cfg.hidden)
        self.b = nn.Linear(d_model, cfg.hidden, bias=False)
        self.out_proj = nn.Linear(cfg.hidden, d_model)
        self.init_weights()

    def forward(self, x, state=None):  # x (B, L, D)
        prev0 = x.new_zeros(x.shape[0], 1, x.shape[2]) if state is None else state["last"]
        prev = torch.cat([prev0, x[:, :-1]], 1)[:, :x.shape[1]]     # x_{t-1}, (B, L, D); L may be 0
        y = self.out_proj(F.silu(self.a(x) + self.b(prev)))
        if state is None:
            return y, None
        return y, {"last": x[:, -1:].contiguous() if x.shape[1] else prev0}

    def init_state(self, batch, max_len, device=None, dtype=None):
        w = self.a.weight
        return {"last": torch.zeros(batch, 1, self.d_model, device=device or w.device, dtype=dtype or w.dtype)}

    def tp_plan(self, tp: int = 1):
        return {r"a\.(weight|bias)": "column", r"b\.weight": "column", r"out_proj\.weight": "row",
                r"out_proj\.bias": "replicate"}
