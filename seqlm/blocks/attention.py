"""Multi-head / grouped-query causal self-attention with RoPE, optional sliding window and
a preallocated KV cache. Pattern char ``*``."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from seqlm.blocks.base import Block, BlockConfig
from seqlm.blocks.plan import Part, Split
from seqlm.ops.attention import attention
from seqlm.ops.rope import RotaryCache
from seqlm.registry import register


class AttentionConfig(BlockConfig):
    type: Literal["attention"] = "attention"
    n_heads: int = Field(4, gt=0, description="Query heads.")
    n_kv_heads: Optional[int] = Field(None, gt=0, description="Key/value heads (GQA); null = n_heads.")
    head_dim: Optional[int] = Field(None, gt=0, description="Per-head width; null = d_model / n_heads.")
    rope: bool = Field(True, description="Rotary position embeddings on q and k.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    rotary_dim: Optional[int] = Field(
        None, gt=0, description="Partial rotary (GPT-NeoX): rotate only the first rotary_dim channels of each "
        "q/k head (even, <= head dim); null = the whole head.")
    window: Optional[int] = Field(None, gt=0, description="Sliding-window size; null = full causal.")
    bias: bool = Field(False, description="Bias in the projections.")

    def check(self, d_model: int) -> list[tuple[str, str]]:
        out = []
        if self.head_dim is None and d_model % self.n_heads:
            out.append(("n_heads", f"must divide d_model={d_model}"))
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            out.append(("n_kv_heads", f"must divide n_heads={self.n_heads}"))
        hd = self.head_dim or (d_model // self.n_heads if d_model % self.n_heads == 0 else 2)
        if self.rope and hd % 2 and self.rotary_dim is None:
            out.append(("head_dim" if self.head_dim else "n_heads", f"rope needs an even head dim, got {hd}"))
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > hd):
            out.append(("rotary_dim", f"must be even and <= the head dim {hd}, got {self.rotary_dim}"))
        return out

    def tp_check(self, d_model: int, tp: int) -> list[tuple[str, str]]:
        if self.n_heads % tp:
            return [("n_heads", f"{self.n_heads} heads do not split over tp_size={tp}")]
        if (self.n_kv_heads or self.n_heads) % tp:
            return [("n_kv_heads", f"{self.n_kv_heads} kv heads do not split over tp_size={tp}")]
        return []


@register("attention", char="*")
class Attention(Block):
    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, d_model: int):
        super().__init__(cfg, d_model)
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.hd = cfg.head_dim or d_model // cfg.n_heads
        self.window = cfg.window
        self.qkv_proj = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.bias)
        self.out_proj = nn.Linear(self.n_heads * self.hd, d_model, bias=cfg.bias)
        self.rot = cfg.rotary_dim or self.hd  # rotated channels of each head (the first ones)
        self.rope = RotaryCache(self.rot, cfg.rope_theta) if cfg.rope else None
        self.init_weights()

    def _qkv(self, x: torch.Tensor, offset: int):
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.hd)
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        if self.rope is not None and self.rot == self.hd:
            qk = self.rope.apply(qk, offset)  # q and k heads rotated in one op
        elif self.rope is not None:  # partial rotary: the first self.rot channels of each head
            qk = torch.cat([self.rope.apply(qk[..., :self.rot], offset), qk[..., self.rot:]], -1)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        return q, k, v.transpose(1, 2)  # (B, H*, T, hd)

    def forward(self, x, state=None, seq_idx=None):
        B, T, _ = x.shape
        if state is None:
            q, k, v = self._qkv(x, 0)
            y = attention(q, k, v, 0, self.window, seq_idx)
        else:
            pos = state["pos"]
            if pos + T > state["k"].shape[2]:
                raise ValueError(
                    f"attention KV cache holds {state['k'].shape[2]} tokens; {pos + T} needed "
                    "(raise max_len in init_state)"
                )
            q, k, v = self._qkv(x, pos)
            state["k"][:, :, pos:pos + T] = k
            state["v"][:, :, pos:pos + T] = v
            lo = 0 if self.window is None else max(0, pos - self.window + 1)
            y = attention(q, state["k"][:, :, lo:pos + T], state["v"][:, :, lo:pos + T], pos - lo, self.window,
                          seq_idx)
            state = {"k": state["k"], "v": state["v"], "pos": pos + T}
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.out_proj(y), state

    def init_state(self, batch, max_len, device=None, dtype=None):
        shape = (batch, self.n_kv, max_len, self.hd)
        dtype = dtype or self.qkv_proj.weight.dtype
        device = device or self.qkv_proj.weight.device
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype), "pos": 0}

    # -- tensor parallelism (seqlm/parallel): query heads and GQA kv heads split ----------
    def tp_plan(self, tp: int = 1):
        # qkv rows are [q heads | k heads | v heads]: each group is cut by whole heads
        q, kv = Part(self.n_heads * self.hd, self.hd), Part(self.n_kv * self.hd, self.hd)
        qkv = Split(0, (q, kv, kv))
        return {r"qkv_proj\.(weight|bias)": qkv, r"out_proj\.weight": Split(1, (q,)),
                r"out_proj\.bias": "replicate"}

    def tp_local(self, tp: int):
        return {"n_heads": self.n_heads // tp, "n_kv": self.n_kv // tp}
