"""Normalisation layers used by the stack (pre-norm) and inside blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlm import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class ScaledLinear(nn.Linear):
    """A Linear whose call may scale the weight's input columns: ``x @ (W * scale)^T + b``
    (Mamba-2 folds its gated norm's weight into out_proj this way)."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight if scale is None else self.weight * scale, self.bias)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


class _GatedRMSNorm(torch.autograd.Function):
    """rms_norm(x * silu(z)) (* weight) over groups of ``group`` channels, holding only x, z
    and the per-group 1/rms for backward (the gated product is recomputed): at 32k tokens and
    d_inner 512 that is 4 KiB per token less than autograd keeping every intermediate. Rows
    are processed in cache-sized blocks (``ops.blocks``), each as 2-D (rows, group) views
    (broadcasting over size-1 middle dims takes a ~6x slower elementwise path on CPU).
    ``weight=None`` skips the affine scale (a caller can fold it into the next matmul)."""

    @staticmethod
    def forward(ctx, x, z, weight, eps: float, group: int):
        shp, C = x.shape, x.shape[-1]
        x2, z2 = x.reshape(-1, C), z.reshape(-1, C)
        gpr = C // group                                               # groups per row
        out = torch.empty_like(x2)
        rstd = x2.new_empty(x2.shape[0] * gpr, 1)
        for sl in ops.blocks(x2.shape[0], C):
            g = (x2[sl] * F.silu(z2[sl])).view(-1, group)
            r = rstd[sl.start * gpr:sl.stop * gpr]
            # 1 / rms from the 2-norm: one pass over g (pow + mean would be two)
            torch.linalg.vector_norm(g, dim=-1, keepdim=True, out=r)
            r.square_().div_(group).add_(eps).rsqrt_()
            if weight is None:
                torch.mul(g, r, out=out[sl].view(-1, group))
            else:
                torch.mul(g.mul_(r).view(-1, C), weight, out=out[sl])
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group = group
        return out.view(shp)

    @staticmethod
    def backward(ctx, go):
        x, z, weight, rstd = ctx.saved_tensors
        shp, group, C = x.shape, ctx.group, x.shape[-1]
        gpr = C // group
        x2, z2, go2 = x.reshape(-1, C), z.reshape(-1, C), go.reshape(-1, C)
        gx, gz = torch.empty_like(x2), torch.empty_like(z2)
        gw = None if weight is None else torch.zeros_like(weight)
        for sl in ops.blocks(x2.shape[0], C):
            xs, zs, gos, r = x2[sl], z2[sl], go2[sl], rstd[sl.start * gpr:sl.stop * gpr]
            s = F.silu(zs)
            g = (xs * s).view(-1, group)                               # gated input, per group
            if weight is None:
                gn = gos.reshape(-1, group)
            else:
                gw += torch.linalg.vecdot(gos, (g * r).view(-1, C), dim=0)
                gn = (gos * weight).view(-1, group)
            # n = g r, d n / d g: r gn - r^3 g mean(gn * g)
            coef = torch.linalg.vecdot(gn, g).unsqueeze(-1).mul_(r.pow(3)).div_(group)
            dg = torch.mul(gn, r).addcmul_(g, coef, value=-1).view(-1, C)
            torch.mul(dg, s, out=gx[sl])
            torch.ops.aten.silu_backward.grad_input(dg.mul_(xs), zs, grad_input=gz[sl])  # x silu'(z)
        return gx.view(shp), gz.view(shp), gw, None, None


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None, eps: float,
                   group: int | None = None) -> torch.Tensor:
    """Mamba-2's gated RMSNorm: ``rms_norm(x * silu(z))`` per group of ``group`` channels
    (default: all of the last dim), times ``weight`` (None: no scale)."""
    group = group or x.shape[-1]
    if torch.is_grad_enabled() and (x.requires_grad or z.requires_grad
                                    or (weight is not None and weight.requires_grad)):
        return _GatedRMSNorm.apply(x, z, weight, eps, group)
    # inference (decode steps): the same formula without the autograd.Function overhead
    g = F.silu(z).mul_(x)
    if group == x.shape[-1]:
        return F.rms_norm(g, (group,), weight, eps)
    g = F.rms_norm(g.view(*g.shape[:-1], -1, group), (group,), None, eps).view(g.shape)
    return g if weight is None else g * weight


def gated_rms_norm_ref(x, z, weight, eps, group=None):
    """Obvious formula (tests)."""
    g = x * F.silu(z)
    group = group or x.shape[-1]
    gv = g.reshape(*g.shape[:-1], -1, group)
    n = (gv * torch.rsqrt(gv.pow(2).mean(-1, keepdim=True) + eps)).reshape(g.shape)
    return n if weight is None else n * weight


class GatedRMSNorm(nn.Module):
    """:func:`gated_rms_norm` with its weight as a module (``scale=False`` skips the weight,
    for a caller that folds it into the next matmul)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z, group: int | None = None, scale: bool = True):
        return gated_rms_norm(x, z, self.weight if scale else None, self.eps, group)
