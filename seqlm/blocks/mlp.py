"""Position-wise MLP: GELU / tanh-GELU / squared ReLU (two matrices) or SwiGLU (three). Pattern char ``-``."""
from __future__ import annotations

from typing import Literal, Optional

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from seqlm.blocks.base import Block, BlockConfig
from seqlm.registry import register


class MLPConfig(BlockConfig):
    type: Literal["mlp"] = "mlp"
    kind: Literal["gelu", "gelu_tanh", "relu2", "swiglu"] = Field(
        "gelu", description="Activation form: `gelu` (exact erf), `gelu_tanh` (tanh approximation, GPT-2's "
        "gelu_new), `relu2` (squared ReLU, Primer / Nemotron-H), `swiglu` (SiLU-gated, three matrices).")
    hidden: Optional[int] = Field(
        None, gt=0, description="Hidden width; null = 4*d_model (two-matrix kinds) or 8/3*d_model rounded up to 64 "
        "(swiglu)."
    )
    bias: bool = Field(False, description="Bias in the linear layers.")

    def tp_check(self, d_model: int, tp: int) -> list[tuple[str, str]]:
        h = self.hidden or (4 * d_model if self.kind != "swiglu" else ((8 * d_model // 3) + 63) // 64 * 64)
        return [("hidden", f"{h} does not split over tp_size={tp}")] if h % tp else []


@register("mlp", char="-")
class MLP(Block):
    Config = MLPConfig

    def __init__(self, cfg: MLPConfig, d_model: int):
        super().__init__(cfg, d_model)
        if cfg.hidden:
            h = cfg.hidden
        elif cfg.kind != "swiglu":
            h = 4 * d_model
        else:
            h = ((8 * d_model // 3) + 63) // 64 * 64
        self.kind = cfg.kind
        self.up_proj = nn.Linear(d_model, h, bias=cfg.bias)
        self.gate_proj = nn.Linear(d_model, h, bias=cfg.bias) if cfg.kind == "swiglu" else None
        self.out_proj = nn.Linear(h, d_model, bias=cfg.bias)
        self.init_weights()

    def forward(self, x, state=None, seq_idx=None):
        if self.kind == "gelu":
            h = F.gelu(self.up_proj(x))
        elif self.kind == "gelu_tanh":
            h = F.gelu(self.up_proj(x), approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.out_proj(h), state

    def tp_plan(self, tp: int = 1):
        return {r"(up|gate)_proj\.(weight|bias)": "column", r"out_proj\.weight": "row",
                r"out_proj\.bias": "replicate"}
