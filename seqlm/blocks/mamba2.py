"""Mamba-2 (SSD, Dao & Gu 2024). Pattern char ``2``.

in_proj -> (z, xBC, dt); causal depthwise conv over xBC -> SiLU; split xBC into x (heads of
head_dim), B and C (ngroups groups of d_state); dt = softplus(dt + dt_bias); scalar
A = -exp(A_log) per head; y = SSD(x, dt, A, B, C) + D x; RMSNorm(y * SiLU(z)) (per group);
out_proj. State: {"conv": (B, conv_dim, d_conv-1), "ssm": (B, H, P, N)}.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from seqlm.blocks.base import Block, BlockConfig
from seqlm.ops.conv import causal_conv1d_step, causal_conv1d_tokens
from seqlm.blocks.plan import Part, Split
from seqlm.ops.norm import GatedRMSNorm, ScaledLinear
from seqlm.ops.ssd import ssd_scan, ssd_step
from seqlm.registry import register


class Mamba2Config(BlockConfig):
    type: Literal["mamba2"] = "mamba2"
    d_state: int = Field(64, gt=0, description="SSM state size N per head (B and C width per group).")
    d_conv: int = Field(4, gt=0, description="Width of the causal depthwise convolution over x, B, C.")
    expand: int = Field(2, gt=0, description="Inner width d_inner = expand * d_model.")
    head_dim: int = Field(32, gt=0, description="Head width P; heads = d_inner / head_dim.")
    ngroups: int = Field(1, gt=0, description="Groups sharing B and C (like GQA); must divide the heads.")
    chunk_size: int = Field(
        64, gt=0, description="SSD chunk length Q: quadratic work inside a chunk, linear across chunks."
    )
    dt_min: float = Field(1e-3, gt=0, description="Smallest initial step size dt (log-uniform init).")
    dt_max: float = Field(0.1, gt=0, description="Largest initial step size dt (log-uniform init).")
    dt_init_floor: float = Field(1e-4, gt=0, description="Lower clamp of the initial dt.")
    A_init_range: tuple[float, float] = Field(
        (1.0, 16.0), description="A = -a per head with a drawn uniformly from this range at init."
    )
    conv_bias: bool = Field(True, description="Bias in the causal convolution.")
    bias: bool = Field(False, description="Bias in in_proj and out_proj.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the gated RMSNorm.")
    dt_floor: float = Field(
        0.0, ge=0, description="Clamp dt = softplus(dt + dt_bias) from below (mamba-ssm's dt_limit[0]; "
        "Nemotron-H uses time_step_min); 0: no clamp.")
    dt_ceil: Optional[float] = Field(
        None, gt=0, description="Clamp dt from above (mamba-ssm's dt_limit[1]); null: no clamp.")

    @model_validator(mode="after")
    def _ranges(self) -> "Mamba2Config":
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range: need 0 < low <= high, got {self.A_init_range}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_max: must be >= dt_min={self.dt_min}, got {self.dt_max}")
        return self

    def check(self, d_model: int) -> list[tuple[str, str]]:
        d_inner = self.expand * d_model
        if d_inner % self.head_dim:
            return [("head_dim", f"must divide expand*d_model={d_inner}, got {self.head_dim}")]
        heads = d_inner // self.head_dim
        if heads % self.ngroups:
            return [("ngroups", f"must divide the number of heads {heads}, got {self.ngroups}")]
        return []

    def tp_check(self, d_model: int, tp: int) -> list[tuple[str, str]]:
        heads = self.expand * d_model // self.head_dim
        if heads % tp:
            return [("head_dim", f"{heads} heads do not split over tp_size={tp}")]
        if self.ngroups % tp and self.ngroups != 1:
            return [("ngroups", f"must be 1 (B/C replicated) or a multiple of tp_size={tp}, got {self.ngroups}")]
        return []


@register("mamba2", char="2")
class Mamba2(Block):
    Config = Mamba2Config

    #: SSM parameters without weight decay (the reference tags A_log, dt_bias and D)
    no_weight_decay = ("A_log", "dt_bias", "D")

    def __init__(self, cfg: Mamba2Config, d_model: int):
        super().__init__(cfg, d_model)
        self.d_inner = cfg.expand * d_model
        self.P, self.N, self.G = cfg.head_dim, cfg.d_state, cfg.ngroups
        self.H = self.d_inner // self.P
        self.conv_dim = self.d_inner + 2 * self.G * self.N
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.H, bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.d_conv))   # (C, K)
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim)) if cfg.conv_bias else None
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm = GatedRMSNorm(self.d_inner, cfg.norm_eps)
        self.out_proj = ScaledLinear(self.d_inner, d_model, bias=cfg.bias)
        self.init_weights()

    def init_weights(self, n_layers: int = 1, std: float = 0.02) -> None:
        super().init_weights(n_layers, std)
        cfg = self.cfg
        with torch.no_grad():
            bound = 1.0 / math.sqrt(cfg.d_conv)  # nn.Conv1d's default for a depthwise conv
            self.conv_weight.uniform_(-bound, bound)
            if self.conv_bias is not None:
                self.conv_bias.uniform_(-bound, bound)
            self.A_log.copy_(torch.empty(self.H).uniform_(*cfg.A_init_range).log())
            lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
            dt = torch.exp(torch.rand(self.H) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    # -- pieces shared by forward and step ---------------------------------------------
    def _split(self, zxbcdt):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.H], dim=-1)

    def _ssm_inputs(self, xBC, dt):
        x, B, C = xBC.split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        if self.cfg.dt_floor > 0 or self.cfg.dt_ceil is not None:
            dt = dt.clamp(self.cfg.dt_floor, self.cfg.dt_ceil)
        return x, B, C, dt, -torch.exp(self.A_log)

    def _out(self, y, z):
        """Gated RMSNorm (per group, like mamba-ssm's RMSNormGated) then out_proj. Over many
        tokens the norm's scale is folded into out_proj's columns, (n * w) @ W^T =
        n @ (W * w)^T: a product over the small weight instead of passes over the
        activations (and their gradients)."""
        group = self.d_inner // self.G
        if y.numel() >= self.out_proj.weight.numel():
            return self.out_proj(self.norm(y, z, group, scale=False), scale=self.norm.weight)
        return self.out_proj(self.norm(y, z, group))

    # -- the interface ------------------------------------------------------------------
    def forward(self, x, state=None, seq_idx=None):
        Bsz, T, _ = x.shape
        # z in its own product: the gate keeps just its d_inner columns alive for backward,
        # not the whole (z, xBC, dt) projection (same weight, same FLOPs)
        W, b = self.in_proj.weight, self.in_proj.bias
        z = F.linear(x, W[:self.d_inner], None if b is None else b[:self.d_inner])
        xBC, dt = F.linear(x, W[self.d_inner:], None if b is None else b[self.d_inner:]).split(
            [self.conv_dim, self.H], dim=-1)
        xBC, conv_state = causal_conv1d_tokens(xBC, self.conv_weight, self.conv_bias,
                                               None if state is None else state["conv"], "silu", seq_idx)
        xs, B, C, dt, A = self._ssm_inputs(xBC, dt)
        y, h = ssd_scan(xs.reshape(Bsz, T, self.H, self.P), dt, A, B.reshape(Bsz, T, self.G, self.N),
                        C.reshape(Bsz, T, self.G, self.N), self.cfg.chunk_size, D=self.D,
                        h0=None if state is None else state["ssm"], return_state=state is not None,
                        seq_idx=seq_idx)
        out = self._out(y.reshape(Bsz, T, self.d_inner), z)
        return out, (None if state is None else {"conv": conv_state, "ssm": h})

    def step(self, x_t, state):
        Bsz = x_t.shape[0]
        z, xBC, dt = self._split(self.in_proj(x_t[:, 0]))
        xBC, conv_state = causal_conv1d_step(xBC, self.conv_weight, self.conv_bias, state["conv"], "silu")
        xs, B, C, dt, A = self._ssm_inputs(xBC, dt)
        y, h = ssd_step(xs.reshape(Bsz, self.H, self.P), dt, A, B.reshape(Bsz, self.G, self.N),
                        C.reshape(Bsz, self.G, self.N), state["ssm"], self.D)
        out = self._out(y.reshape(Bsz, self.d_inner), z)
        return out[:, None], {"conv": conv_state, "ssm": h}

    def init_state(self, batch, max_len, device=None, dtype=None):
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return {"conv": torch.zeros(batch, self.conv_dim, self.cfg.d_conv - 1, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, self.H, self.P, self.N, device=device, dtype=dtype)}

    # -- tensor parallelism (seqlm/parallel): heads split; B/C by group, or replicated ------
    def _bc_unit(self, tp: int) -> int:
        return self.N if self.G % tp == 0 else 0  # 0: every rank holds all of B and C

    def tp_plan(self, tp: int = 1):
        di, gn = self.d_inner, self.G * self.N
        ch = (Part(di, self.P), Part(gn, self._bc_unit(tp)), Part(gn, self._bc_unit(tp)))  # [x|B|C]
        proj = Split(0, (Part(di, self.P),) + ch + (Part(self.H),))                      # [z|x|B|C|dt]
        inner = Split(0, (Part(di, self.P),))
        return {r"in_proj\.(weight|bias)": proj, r"conv_(weight|bias)": Split(0, ch),
                r"(A_log|dt_bias|D)": "column", r"norm\.weight": inner,
                r"out_proj\.weight": Split(1, (Part(di, self.P),)), r"out_proj\.bias": "replicate"}

    def tp_local(self, tp: int):
        G = self.G // tp if self._bc_unit(tp) else self.G
        di = self.d_inner // tp
        return {"d_inner": di, "H": self.H // tp, "G": G, "conv_dim": di + 2 * G * self.N}

    def tp_reduce(self, tp: int):
        # ngroups not split: a norm group spans every rank's channels
        return {"out_proj": "row", **({"norm": "norm"} if tp > 1 and not self._bc_unit(tp) else {})}
