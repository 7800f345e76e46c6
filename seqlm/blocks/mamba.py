"""Mamba-1 (selective SSM, Gu & Dao 2023). Pattern char ``M``.

in_proj -> (x, z); causal depthwise conv over x -> SiLU; x_proj(x) -> (dt low rank, B, C);
delta = softplus(dt_proj(dt) + bias); A = -exp(A_log) per (channel, state) (S4D-real init);
y = selective_scan(x, delta, A, B, C) + D x, gated by SiLU(z); out_proj.
State: {"conv": (B, d_inner, d_conv-1), "ssm": (B, d_inner, d_state)}.
"""
from __future__ import annotations

import math
from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from seqlm.blocks.base import Block, BlockConfig
from seqlm.blocks.plan import Part, Split
from seqlm.ops.conv import causal_conv1d_step, causal_conv1d_tokens
from seqlm.ops.selective_scan import selective_scan, selective_scan_step
from seqlm.registry import register


class MambaConfig(BlockConfig):
    type: Literal["mamba"] = "mamba"
    d_state: int = Field(16, gt=0, description="SSM state size N per channel (width of B and C).")
    d_conv: int = Field(4, gt=0, description="Width of the causal depthwise convolution over x.")
    expand: int = Field(2, gt=0, description="Inner width d_inner = expand * d_model.")
    dt_rank: Union[Literal["auto"], int] = Field(
        "auto", description="Rank of the dt projection (x_proj -> dt_proj); auto = ceil(d_model / 16).")
    dt_min: float = Field(1e-3, gt=0, description="Smallest initial step size dt (log-uniform init).")
    dt_max: float = Field(0.1, gt=0, description="Largest initial step size dt (log-uniform init).")
    dt_init_floor: float = Field(1e-4, gt=0, description="Lower clamp of the initial dt.")
    conv_bias: bool = Field(True, description="Bias in the causal convolution.")
    bias: bool = Field(False, description="Bias in in_proj and out_proj.")
    chunk_size: int = Field(
        64, gt=0, description="Scan chunk length: states are kept only at chunk starts and "
        "recomputed per chunk in the backward (memory linear in L); no effect on results.")

    @model_validator(mode="after")
    def _ranges(self) -> "MambaConfig":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_max: must be >= dt_min={self.dt_min}, got {self.dt_max}")
        if isinstance(self.dt_rank, int) and self.dt_rank <= 0:
            raise ValueError(f"dt_rank: must be > 0 or 'auto', got {self.dt_rank}")
        return self

    def rank(self, d_model: int) -> int:
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    def check(self, d_model: int) -> list[tuple[str, str]]:
        d_inner = self.expand * d_model
        if self.rank(d_model) > d_inner:
            return [("dt_rank", f"must be <= expand*d_model={d_inner}, got {self.dt_rank}")]
        return []

    def tp_check(self, d_model: int, tp: int) -> list[tuple[str, str]]:
        if (self.expand * d_model) % tp:
            return [("expand", f"d_inner={self.expand * d_model} does not split over tp_size={tp}")]
        return []


@register("mamba", char="M")
class Mamba(Block):
    Config = MambaConfig

    #: SSM parameters without weight decay (the reference tags A_log and D ``_no_weight_decay``)
    no_weight_decay = ("A_log", "D", "dt_proj.bias")

    def __init__(self, cfg: MambaConfig, d_model: int):
        super().__init__(cfg, d_model)
        self.d_inner, self.N, self.R = cfg.expand * d_model, cfg.d_state, cfg.rank(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(self.d_inner, cfg.d_conv))  # (C, K)
        self.conv_bias = nn.Parameter(torch.empty(self.d_inner)) if cfg.conv_bias else None
        self.x_proj = nn.Linear(self.d_inner, self.R + 2 * self.N, bias=False)
        self.dt_proj = nn.Linear(self.R, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.N))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        self.init_weights()

    def init_weights(self, n_layers: int = 1, std: float = 0.02) -> None:
        super().init_weights(n_layers, std)
        cfg = self.cfg
        with torch.no_grad():
            bound = 1.0 / math.sqrt(cfg.d_conv)  # nn.Conv1d's default for a depthwise conv
            self.conv_weight.uniform_(-bound, bound)
            if self.conv_bias is not None:
                self.conv_bias.uniform_(-bound, bound)
            r = self.R ** -0.5
            self.dt_proj.weight.uniform_(-r, r)
            lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
            dt = torch.exp(torch.rand(self.d_inner) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            n = torch.arange(1, self.N + 1, dtype=torch.float32)
            self.A_log.copy_(n.log().expand(self.d_inner, self.N))       # S4D-real: A = -(1..N)
            self.D.fill_(1.0)

    def _ssm_inputs(self, xc):
        """xc (..., d_inner) -> raw delta (..., d_inner) (bias added in the scan), B, C (..., N)."""
        dt, B, C = self.x_proj(xc).split([self.R, self.N, self.N], dim=-1)
        return dt @ self.dt_proj.weight.t(), B, C

    def _in_proj(self, x):
        """(x, z) by two matmuls on the halves of in_proj (no (L, 2 d_inner) split/cat)."""
        W, b, n = self.in_proj.weight, self.in_proj.bias, self.d_inner
        return (F.linear(x, W[:n], None if b is None else b[:n]),
                F.linear(x, W[n:], None if b is None else b[n:]))

    def forward(self, x, state=None, seq_idx=None):
        xs, z = self._in_proj(x)                                               # (B, L, d_inner)
        xc, conv_state = causal_conv1d_tokens(xs, self.conv_weight, self.conv_bias,
                                               None if state is None else state["conv"], "silu", seq_idx)
        delta, B, C = self._ssm_inputs(xc)
        y, h = selective_scan(xc, delta, -torch.exp(self.A_log), B, C, self.D, z, self.dt_proj.bias,
                              True, None if state is None else state["ssm"], self.cfg.chunk_size, seq_idx)
        out = self.out_proj(y)
        return out, (None if state is None else {"conv": conv_state, "ssm": h})

    def step(self, x_t, state):
        xs, z = self.in_proj(x_t[:, 0]).chunk(2, dim=-1)                        # (B, d_inner)
        xc, conv_state = causal_conv1d_step(xs, self.conv_weight, self.conv_bias, state["conv"], "silu")
        delta, B, C = self._ssm_inputs(xc)
        y, h = selective_scan_step(xc, delta, -torch.exp(self.A_log), B, C, state["ssm"], self.D, z,
                                   self.dt_proj.bias, True)
        return self.out_proj(y)[:, None], {"conv": conv_state, "ssm": h}

    def init_state(self, batch, max_len, device=None, dtype=None):
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return {"conv": torch.zeros(batch, self.d_inner, self.cfg.d_conv - 1, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, self.d_inner, self.N, device=device, dtype=dtype)}

    # -- tensor parallelism (seqlm/parallel): channels (d_inner) split ----------------------
    def tp_plan(self, tp: int = 1):
        # in_proj rows are [x | z]; conv, dt_proj, A_log, D follow their channels; x_proj and
        # out_proj read channels (row-parallel): their outputs are all-reduced (tp_reduce)
        n = self.d_inner
        return {r"in_proj\.(weight|bias)": Split(0, (Part(n), Part(n))), r"conv_(weight|bias)": "column",
                r"dt_proj\.(weight|bias)": "column", r"(A_log|D)": "column", r"x_proj\.weight": "row",
                r"out_proj\.weight": "row", r"out_proj\.bias": "replicate"}

    def tp_local(self, tp: int):
        return {"d_inner": self.d_inner // tp}

    def tp_reduce(self, tp: int):
        # dt, B and C must see every channel, and feed sharded compute again
        return {"out_proj": "row", "x_proj": "row_grad"}
