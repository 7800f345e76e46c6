"""Rotary position embeddings (rotate-half form)."""
from __future__ import annotations

import torch


class RotaryCache:
    """Lazily grown cos/sin tables; ``apply(x, offset)`` rotates x: (B, H, T, hd)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.cos = self.sin = None

    def _tables(self, n: int, device, dtype):
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != device:
            size = max(n, 2 * (self.cos.shape[0] if self.cos is not None else 0), 256)
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim))
            ang = torch.outer(torch.arange(size, device=device, dtype=torch.float64), inv)
            ang = torch.cat([ang, ang], dim=-1)  # (size, hd)
            self.cos, self.sin = ang.cos().float(), ang.sin().float()
        return self.cos, self.sin

    def apply(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.shape[-2]
        cos, sin = self._tables(offset + T, x.device, x.dtype)
        cos = cos[offset:offset + T].to(x.dtype)
        sin = sin[offset:offset + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
        return x * cos + rot * sin
