"""Rotary position embeddings, pairs interleaved (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d).

Applied as one complex multiplication on (B, T, n_heads, head_dim) tensors — the cheapest
form on CPU (one elementwise op forward and backward). ``rope_ref`` is the obvious
per-pair rotation the tests compare against.
"""
from __future__ import annotations

import torch


class RotaryCache:
    """Lazily grown table of e^{i * pos * freq}; ``apply(x, offset)`` rotates x (B, T, H, hd)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self._table: torch.Tensor | None = None  # (n, hd/2) complex128

    def table(self, n: int, device) -> torch.Tensor:
        t = self._table
        if t is None or t.shape[0] < n or t.device != device:
            size = max(n, 2 * (t.shape[0] if t is not None else 0), 256)
            ang = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq(self.head_dim, self.theta))
            self._table = torch.polar(torch.ones_like(ang), ang).to(device)
        return self._table

    def apply(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        B, T, H, hd = x.shape
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        cdtype = torch.complex128 if work.dtype == torch.float64 else torch.complex64
        f = self.table(offset + T, x.device)[offset:offset + T].to(cdtype)[:, None, :]  # (T, 1, hd/2)
        xc = torch.view_as_complex(work.reshape(B, T, H, hd // 2, 2))
        return torch.view_as_real(xc * f).reshape(B, T, H, hd).to(x.dtype)


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rope_ref(x: torch.Tensor, offset: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) of x (B, T, H, hd) by angle (offset+t)*freq_i."""
    B, T, H, hd = x.shape
    out = torch.empty_like(x)
    freqs = inv_freq(hd, theta)
    for t in range(T):
        for i in range(hd // 2):
            a = torch.tensor((offset + t) * freqs[i].item(), dtype=torch.float64)
            c, s = torch.cos(a).to(x.dtype), torch.sin(a).to(x.dtype)
            x0, x1 = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
            out[:, t, :, 2 * i] = x0 * c - x1 * s
            out[:, t, :, 2 * i + 1] = x0 * s + x1 * c
    return out
