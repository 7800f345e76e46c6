"""Differentiable collectives over a tensor-parallel group (Megatron's f / g operators).

Under TP every rank computes the same loss from the same replicated activations, and each
rank's backward sees only its own shard's share of a gradient. So:
- ``copy_to(x)``: a replicated activation enters sharded compute: identity forward,
  all-reduce of the (partial) input gradient backward;
- ``reduce_from(y)``: a row-parallel partial sum returns to replicated compute: all-reduce
  forward, identity backward;
- ``all_reduce_sum(y)``: a partial sum that feeds sharded compute again (Mamba-1's
  x_proj -> dt/B/C, a gated norm's statistics): all-reduce forward and backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous().clone()
    dist.all_reduce(t, group=group)
    return t


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _reduce(g, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        return _reduce(y, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _reduce(y, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce(g, ctx.group), None


def copy_to(x, group):
    return _CopyTo.apply(x, group)


def reduce_from(y, group):
    return _ReduceFrom.apply(y, group)


def all_reduce_sum(y, group):
    return _AllReduceSum.apply(y, group)
