"""Tensor parallelism applied from outside: shard a built model by its blocks' plans.

``shard_model(model, group)`` cuts every parameter the plan splits (``Split``: fused
sub-parts, per-head/per-group units, 1-D per-channel parameters following their channels)
down to this rank's slice, in place (same Parameter objects, so tied and recursive-shared
weights stay shared); sets each block's per-rank sizes (``Block.tp_local``); turns the
modules ``Block.tp_reduce`` names into their parallel forms (row-parallel Linears with
their all-reduce; a gated RMSNorm whose statistics are all-reduced); puts ``copy_to`` on
every block's input; and registers gradient all-reduces for replicated parameters (or
replicated parts) whose gradients are partial sums. Sharded parameters are marked
``tensor_model_parallel`` (DeepSpeed counts them once per rank in the gradient norm, and
replicated ones once per group).

Why not DeepSpeed AutoTP alone: its ``partition_config`` shards 2-D ``.weight``s only; it
cannot cut Mamba's conv weights, A_log, D, dt bias or norm weights with their channels,
nor add the all-reduces inside Mamba-1 (x_proj) and Mamba-2's gated norm. One mechanism
for all blocks (this one) keeps attention, MLP and the SSMs consistent and reshardable; it
runs on DeepSpeed's own TP group (``deepspeed.utils.groups``).

``gather_state_dict(model)`` is the inverse: the full, unsharded state dict (TP rank 0
holds it), from which any TP size can be loaded again.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seqlm.blocks.base import Block
from seqlm.blocks.plan import Replicate, Split, as_spec, local_ranges
from seqlm.parallel.comm import all_reduce_sum, copy_to, reduce_from


class RowParallelLinear(nn.Linear):
    """A Linear whose weight holds this rank's input columns: ``x_local @ W_local^T`` is a
    partial sum, all-reduced, then the (replicated) bias is added once."""

    tp_group = None
    tp_mode = "row"  # "row": identity backward; "row_grad": all-reduce backward too

    tp_overlap = None  # a ladder Overlap: all-reduce issued async, waited one sub-layer later

    def forward(self, x, scale=None):
        y = F.linear(x, self.weight if scale is None else self.weight * scale)
        ov = self.tp_overlap
        if ov is not None and ov.active and self.bias is None and self.tp_mode == "row":
            return ov.reduce(y, self.tp_group)
        y = (reduce_from if self.tp_mode == "row" else all_reduce_sum)(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class SpanGatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm when one norm group spans the channels of ``tp_span`` ranks:
    the per-group sums of squares are all-reduced, so every rank normalises its channels by
    the statistics of the whole group (the same function as TP=1)."""

    tp_group = None
    tp_span = 1

    def forward(self, x, z, group=None, scale=True):
        group = group or x.shape[-1]
        g = (x * F.silu(z)).float()
        gv = g.reshape(*g.shape[:-1], -1, group)                    # (..., groups, group)
        ss = all_reduce_sum(gv.pow(2).sum(-1, keepdim=True), self.tp_group)
        n = (gv * torch.rsqrt(ss / (group * self.tp_span) + self.eps)).reshape(g.shape).to(x.dtype)
        return n * self.weight if scale else n


def _sum_rows(dim: int, ranges: list[tuple[int, int]], group):
    """Gradient hook: all-reduce the rows (along ``dim``) of replicated parts."""
    def hook(g):
        g = g.clone()
        for a, b in ranges:
            sl = g.narrow(dim, a, b - a)
            buf = sl.contiguous()
            dist.all_reduce(buf, group=group)
            sl.copy_(buf)
        return g
    return hook


def _sum_all(group):
    def hook(g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=group)
        return g
    return hook


def resolve_plan(model: nn.Module, tp: int) -> dict[str, object]:
    """Parameter name -> spec (Split / Replicate) for every parameter; a parameter no plan
    entry matches, or one matched twice, is an error (naming it)."""
    plan = {k: as_spec(v) for k, v in model.tp_plan(tp).items()}
    out = {}
    for name, _ in model.named_parameters():
        hits = [v for k, v in plan.items() if re.fullmatch(k, name)]
        if len(hits) != 1:
            raise ValueError(f"tp_plan: parameter {name!r} matched by {len(hits)} plan entries (need 1)")
        out[name] = hits[0]
    return out


def _block_input_hook(group):
    def pre(mod, args, kwargs):
        return (copy_to(args[0], group),) + tuple(args[1:]), kwargs
    return pre


def shard_model(model: nn.Module, group, ladder_overlap: bool = False) -> nn.Module:
    """Shard ``model`` (built full-size, identical on every rank of ``group``) in place."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if tp == 1:
        return model
    specs = resolve_plan(model, tp)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    local = [(b, b.tp_local(tp), b.tp_reduce(tp)) for b in blocks]   # read before any change
    for name, p in model.named_parameters():
        spec = specs[name]
        p.tp_spec = spec
        if isinstance(spec, Replicate):
            if spec.grad_sum:
                p.register_hook(_sum_all(group))
            continue
        ranges = local_ranges(spec, p.shape[spec.dim], tp, rank)
        with torch.no_grad():
            p.data = torch.cat([p.narrow(spec.dim, a, b - a) for a, b, _ in ranges], spec.dim).contiguous()
        p.tensor_model_parallel = True
        p.partition_dim = spec.dim
        rep, off = [], 0
        for a, b, r in ranges:
            if r:
                rep.append((off, off + b - a))
            off += b - a
        if rep:
            p.register_hook(_sum_rows(spec.dim, rep, group))
    for blk, attrs, reduce in local:
        for k, v in attrs.items():
            setattr(blk, k, v)
        for path, kind in reduce.items():
            mod = blk.get_submodule(path)
            if kind in ("row", "row_grad"):
                mod.__class__ = RowParallelLinear
                mod.tp_group, mod.tp_mode = group, kind
            elif kind == "norm":
                mod.__class__ = SpanGatedRMSNorm
                mod.tp_group, mod.tp_span = group, tp
            else:
                raise ValueError(f"tp_reduce: unknown kind {kind!r} for {type(blk).__name__}.{path}")
        blk.register_forward_pre_hook(_block_input_hook(group), with_kwargs=True)
    model.tp_group, model.tp_size = group, tp
    model.tp_overlap = _ladder_overlap(model) if ladder_overlap else []
    return model


def _ladder_overlap(model: nn.Module) -> list:
    """Attach an :class:`~seqlm.parallel.ladder.Overlap` to every ladder stack without
    dropout: its blocks' out_proj all-reduces run async, waited one sub-layer later."""
    from seqlm.parallel.ladder import Overlap
    from seqlm.stack import Stack

    out = []
    for st in (m for m in model.modules() if isinstance(m, Stack)):
        if not st.ladder or st.cfg.dropout > 0 or st.n_layers < 2:
            continue
        ov = Overlap(st.n_layers)
        for blk in st.blocks:
            out_proj = getattr(blk, "out_proj", None)
            if isinstance(out_proj, RowParallelLinear):
                out_proj.tp_overlap = ov
            blk.register_forward_pre_hook(ov.pre, with_kwargs=True)
            blk.register_forward_hook(ov.post, with_kwargs=True)
        out.append(ov)
    return out


@torch.no_grad()
def gather_like(p: nn.Parameter, t: torch.Tensor, group) -> torch.Tensor:
    """The full tensor of which ``t`` (shaped like the sharded ``p``: its data or its
    gradient) is this rank's slice under ``p.tp_spec``."""
    spec = getattr(p, "tp_spec", None)
    if not isinstance(spec, Split):
        return t
    tp = dist.get_world_size(group)
    pieces = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(pieces, t.contiguous(), group=group)
    n_full = sum(q.size for q in spec.parts) if spec.parts else t.shape[spec.dim] * tp
    cols, off = [], 0
    for a, b, rep in local_ranges(spec, n_full, tp, 0):
        n = b - a
        cols.append(pieces[0].narrow(spec.dim, off, n) if rep
                    else torch.cat([pc.narrow(spec.dim, off, n) for pc in pieces], spec.dim))
        off += n
    return torch.cat(cols, spec.dim)


@torch.no_grad()
def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model; every rank of the group gets it."""
    group = getattr(model, "tp_group", None)
    full = dict(model.state_dict())
    if group is not None:
        for name, p in model.named_parameters():
            full[name] = gather_like(p, p.detach(), group)
    return full
