"""Document boundaries inside a packed window (``seq_idx``).

``seq_idx`` (B, L) int: per row non-decreasing, 0 at the first position, +1 at the first
token of each new document (mamba_ssm's convention). Positions before the window (a carried
state: KV cache, conv/SSM state) count as document 0, so a state passed with ``seq_idx``
continues the window's first document only. ``None`` everywhere means one stream.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_seq_idx(seq_idx: Optional[Tensor], batch: int, length: int) -> None:
    """ValueError unless ``seq_idx`` is None or an integer (batch, length) tensor that is
    non-decreasing per row and starts at 0."""
    if seq_idx is None:
        return
    if not isinstance(seq_idx, Tensor) or seq_idx.is_floating_point() or seq_idx.is_complex():
        raise ValueError("seq_idx: must be an integer tensor (B, T)")
    if tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"seq_idx: shape {tuple(seq_idx.shape)} does not match the tokens' ({batch}, {length})")
    if length and (bool((seq_idx[:, 0] != 0).any()) or bool((seq_idx.diff(dim=1) < 0).any())):
        raise ValueError("seq_idx: each row must start at 0 and never decrease")


def doc_starts(seq_idx: Tensor) -> Tensor:
    """(B, L) bool: True where a new document starts inside the window (never at t = 0)."""
    out = torch.zeros_like(seq_idx, dtype=torch.bool)
    out[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return out


def same_doc_back(seq_idx: Tensor, j: int) -> Tensor:
    """(B, L) bool: position t and position t - j are in the same document (t - j < 0 is
    document 0: a carried state or the zero padding before the window)."""
    prev = torch.zeros_like(seq_idx)
    if j < seq_idx.shape[1]:
        prev[:, j:] = seq_idx[:, : seq_idx.shape[1] - j]
    return prev == seq_idx


def segments(seq_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Documents of the flattened (B*L) window: (starts, lengths), LongTensors on CPU."""
    B, L = seq_idx.shape
    new = doc_starts(seq_idx)
    new[:, 0] = True
    starts = new.reshape(-1).nonzero()[:, 0].cpu()
    ends = torch.cat([starts[1:], torch.tensor([B * L])])
    return starts, ends - starts


def merge_sizes(size: Tensor, cost, overhead: float) -> Tensor:
    """Round bucket sizes ``size`` (per document) up to fewer distinct sizes where one call
    fewer saves more than the padding costs: ``cost(n)`` is the work of one document padded
    to n, ``overhead`` the fixed cost of a call, in the same units. Exact minimum over
    groupings of consecutive sizes (dynamic programming over the distinct sizes)."""
    sizes, counts = size.unique(return_counts=True)
    sizes, counts = sizes.tolist(), counts.tolist()
    k = len(sizes)
    best, cut = [0.0] + [float("inf")] * k, [0] * (k + 1)          # best[j]: sizes[:j] laid out
    for j in range(1, k + 1):
        for i in range(j):  # sizes[i:j] share one call of size sizes[j-1]
            c = best[i] + overhead + sum(counts[i:j]) * cost(sizes[j - 1])
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = size.clone(), k
    while j:
        i = cut[j]
        out[(size >= sizes[i]) & (size <= sizes[j - 1])] = sizes[j - 1]
        j = i
    return out


def bucket_layout(starts: Tensor, lens: Tensor, total: int, steps: int = 1, merge=None):
    """Lay documents (flat ``starts``, ``lens`` over ``total`` tokens) out for batched
    per-document kernels: documents are grouped by length rounded up to 2^steps sizes per
    octave (<= 2^-steps padding) and each group is an (m, n) block of m documents
    right-padded to n slots. Returns ``src`` (P,) the token of each slot (padding slots point
    at some real token: for causal kernels right padding never reaches a real output),
    ``real`` (P,) bool, and ``buckets`` [(m, n)] in slot order. ``merge`` (cost, overhead):
    fewer buckets where a call costs more than the padding (:func:`merge_sizes`)."""
    step = 2 ** (torch.floor(torch.log2(lens.double())).long() - steps).clamp(min=0)
    size = (lens + step - 1) // step * step
    if merge is not None:
        size = merge_sizes(size, *merge)
    src, real, buckets = [], [], []
    for n in size.unique().tolist():
        sel = size == n
        ar = torch.arange(n)
        idx = starts[sel, None] + ar                                  # (m, n)
        src.append(idx.clamp(max=total - 1).reshape(-1))
        real.append((ar < lens[sel, None]).reshape(-1))
        buckets.append((int(sel.sum()), n))
    return torch.cat(src), torch.cat(real), buckets


def slot_of(src: Tensor, real: Tensor, total: int) -> Tensor:
    """(total,) the slot of each token in a :func:`bucket_layout` (src[slot_of[i]] == i)."""
    inv = torch.empty(total, dtype=torch.long, device=src.device)
    inv[src[real]] = real.nonzero()[:, 0]
    return inv


class _ToSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return g.index_select(0, inv), None, None


class _FromSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, inv):
        ctx.save_for_backward(inv)
        ctx.slots = y.shape[0]
        return y.index_select(0, inv)

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return g.new_zeros((ctx.slots,) + tuple(g.shape[1:])).index_copy_(0, inv, g), None


def to_slots(x: Tensor, src: Tensor, inv: Tensor) -> Tensor:
    """x (N, ...) tokens -> x[src] (P, ...) slots of a :func:`bucket_layout`, with ``inv`` =
    :func:`slot_of`. Backward gathers each token's gradient from its own slot (one gather,
    no scatter-add): the padding slots' gradients are dropped, which is exact for causal
    per-document kernels, where a right-padding slot reaches only padding outputs and those
    get zero gradient from :func:`from_slots` (``x[src]`` would add their ~0 back)."""
    return _ToSlots.apply(x, src, inv)


def from_slots(y: Tensor, inv: Tensor) -> Tensor:
    """y (P, ...) slot outputs -> y[inv] (N, ...) in token order; the padding slots get zero
    gradient."""
    return _FromSlots.apply(y, inv)

