"""Causal (optionally sliding-window) attention with a query offset, for training, chunked
prefill against a KV cache and single-token decode.

``attention(q, k, v, q_offset, window)``: q (B, H, Tq, hd), k/v (B, Hkv, Tk, hd), query i
sits at absolute position ``q_offset + i`` and key j at position j. Uses flash-attn on CUDA
when it is importable, else ``scaled_dot_product_attention``. ``attention_ref`` is the
obvious softmax(QK^T) reference the tests compare against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional CUDA fast path
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


FLASH_MAX_HEAD_DIM = 256  # flash_api.cpp: head dimension at most 256


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


def attention(q, k, v, q_offset: int = 0, window: int | None = None) -> torch.Tensor:
    B, H, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
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


def attention_ref(q, k, v, q_offset: int = 0, window: int | None = None) -> torch.Tensor:
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = _mask(q.shape[2], k.shape[2], q_offset, window, q.device)
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
