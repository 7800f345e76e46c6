"""Causal (optionally sliding-window) attention with a query offset, for training, chunked
prefill against a KV cache and single-token decode.

``attention(q, k, v, q_offset, window, seq_idx)``: q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd),
query i sits at absolute position ``q_offset + i`` and key j at position j. ``seq_idx``
(B, Tq) marks documents (seqlm/ops/docs.py): a query sees only keys of its own document
(block-diagonal causal mask; keys before ``q_offset`` count as document 0). Uses flash-attn on CUDA
when it is importable, else ``scaled_dot_product_attention``. ``attention_ref`` is the
obvious softmax(QK^T) reference the tests compare against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional CUDA fast path
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = _flash_varlen = None


FLASH_MAX_HEAD_DIM = 256  # flash_api.cpp: head dimension at most 256
# Packed windows up to this length run one SDPA call with the block-diagonal causal mask;
# longer ones run per-document length buckets (_sdpa_docs). The mask costs ~T^2 whatever
# the documents, the buckets ~sum of l^2 plus a gather and a few calls: fwd+bwd of 8 x 256
# tokens, 4 heads of 32 (1 thread, Xeon), mask 1.2x a plain causal call, buckets 1.25-1.35x;
# at 4 x 512 the buckets are as fast as the mask or faster, at 2 x 1024 0.7-1.2x the plain
# call against the mask's 1.7x.
DOC_MASK_MAX_LEN = 384


def use_flash(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> bool:
    """flash-attn imports, q is on CUDA and its contract holds (csrc/flash_attn/flash_api.cpp):
    fp16/bf16 q, k and v of one dtype, head dim <= 256, query heads a multiple of KV heads."""
    if _flash_attn_func is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if k is None:
        return True
    return (k.dtype == q.dtype and (v is None or v.dtype == q.dtype) and q.shape[-1] <= FLASH_MAX_HEAD_DIM
            and k.shape[-1] == q.shape[-1] and q.shape[1] % k.shape[1] == 0)


def _mask(Tq: int, Tk: int, q_offset: int, window: int | None, device) -> torch.Tensor:
    qpos = torch.arange(Tq, device=device)[:, None] + q_offset
    kpos = torch.arange(Tk, device=device)[None, :]
    m = kpos <= qpos
    if window is not None:
        m = m & (kpos > qpos - window)
    return m  # (Tq, Tk) bool, True = attend


def _doc_mask(Tq: int, Tk: int, q_offset: int, window: int | None, seq_idx) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: causal (and window) mask restricted to each query's document."""
    kdoc = torch.zeros(seq_idx.shape[0], Tk, dtype=seq_idx.dtype, device=seq_idx.device)
    kdoc[:, q_offset:q_offset + Tq] = seq_idx[:, :Tk - q_offset]  # keys before q_offset: doc 0
    same = seq_idx[:, :, None] == kdoc[:, None, :]                  # (B, Tq, Tk)
    return (same & _mask(Tq, Tk, q_offset, window, seq_idx.device))[:, None]


def _flash_docs(q, k, v, window, seq_idx):
    """flash-attn varlen over the documents of a packed window (q/k/v (B, H*, T, hd))."""
    from seqlm.ops.docs import segments

    B, H, T, hd = q.shape
    starts, lens = segments(seq_idx)
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32).to(q.device)
    flat = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], hd)  # noqa: E731
    out = _flash_varlen(flat(q), flat(k), flat(v), cu, cu, int(lens.max()), int(lens.max()), causal=True,
                        window_size=(window - 1, 0) if window else (-1, -1))
    return out.view(B, T, H, hd).transpose(1, 2)


def _sdpa_docs(q, k, v, seq_idx):
    """Causal attention inside each document of a packed window, without a (T, T) mask: the
    documents are gathered into length buckets (seqlm/ops/docs.py, right-padded) and each
    bucket runs SDPA with ``is_causal`` (its fast kernel); work ~ sum of squared document
    lengths instead of T^2. q (B, H, T, hd), k/v (B, Hkv, T, hd)."""
    from seqlm.ops.docs import bucket_layout, from_slots, segments, slot_of, to_slots

    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    starts, lens = segments(seq_idx)
    src, real, buckets = bucket_layout(starts, lens, B * T)
    src, real = src.to(q.device), real.to(q.device)
    inv = slot_of(src, real, B * T)
    flat = lambda t: to_slots(t.transpose(1, 2).reshape(B * T, t.shape[1], hd), src, inv)  # noqa: E731 (P, H*, hd)
    sizes = [m * n for m, n in buckets]
    outs = []
    for (m, n), qs, ks, vs in zip(buckets, *(flat(t).split(sizes) for t in (q, k, v))):
        o = F.scaled_dot_product_attention(*(t.view(m, n, -1, hd).transpose(1, 2) for t in (qs, ks, vs)),
                                           is_causal=True, enable_gqa=Hkv != H)
        outs.append(o.transpose(1, 2).reshape(m * n, H, hd))
    return from_slots(torch.cat(outs), inv).view(B, T, H, hd).transpose(1, 2)


def attention(q, k, v, q_offset: int = 0, window: int | None = None, seq_idx=None) -> torch.Tensor:
    B, H, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if seq_idx is not None:
        if use_flash(q, k, v) and _flash_varlen is not None and q_offset == 0 and Tq == Tk:
            return _flash_docs(q, k, v, window, seq_idx)
        if window is None and q_offset == 0 and Tq > DOC_MASK_MAX_LEN and Tq == Tk:
            return _sdpa_docs(q, k, v, seq_idx)
        mask = _doc_mask(Tq, Tk, q_offset, window, seq_idx)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
    if use_flash(q, k, v) and Tk == q_offset + Tq:
        out = _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
            window_size=(window - 1, 0) if window else (-1, -1),
        )
        return out.transpose(1, 2)
    gqa = Hkv != H
    if window is None and q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if window is None and Tq == 1:  # decode: every cached key is visible
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = _mask(Tq, Tk, q_offset, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attention_ref(q, k, v, q_offset: int = 0, window: int | None = None, seq_idx=None) -> torch.Tensor:
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = _mask(q.shape[2], k.shape[2], q_offset, window, q.device)
    if seq_idx is not None:  # key j (absolute) belongs to doc seq_idx[j - q_offset], or 0 before
        Tq, Tk = q.shape[2], k.shape[2]
        docs = [[int(seq_idx[b, j - q_offset]) if j >= q_offset else 0 for j in range(Tk)]
                for b in range(q.shape[0])]
        kd = torch.tensor(docs, device=q.device)
        mask = mask & (seq_idx[:, :, None] == kd[:, None, :])[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def attention_probs(q, k, q_offset: int = 0, window: int | None = None) -> torch.Tensor:
    """The (B, H, Tq, Tk) attention matrix (used by MOHAWK matrix orientation)."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = _mask(q.shape[2], k.shape[2], q_offset, window, q.device)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
