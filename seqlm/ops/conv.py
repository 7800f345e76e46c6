"""Causal depthwise conv1d with a carried state (Mamba-1/2 short convolution).

x (B, C, L), weight (C, K), bias (C,) -> y (B, C, L) with y[..., t] depending on
x[..., t-K+1 .. t]. ``state`` (B, C, K-1) holds the inputs before x (zeros at the start);
the new state is the last K-1 inputs (contiguous, one layout for every path). Uses
causal-conv1d on CUDA when importable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from seqlm import ops

try:  # optional CUDA fast path
    from causal_conv1d import causal_conv1d_fn as _cc1d_fn  # type: ignore
except Exception:  # noqa: BLE001
    _cc1d_fn = None


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_cuda_conv(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None) -> bool:
    """causal-conv1d is importable, the tensors live on CUDA and its contract holds
    (csrc/causal_conv1d.cpp): width 2-4, fp32/fp16/bf16 input and weight, bias of the
    weight's dtype, activation None or silu. Layout is fixed by :func:`kernel_layout`."""
    if _cc1d_fn is None or not x.is_cuda:
        return False
    if weight is None:
        return True
    return (2 <= weight.shape[1] <= 4 and x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES
            and (bias is None or bias.dtype == weight.dtype) and activation in (None, "silu"))


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, L) as causal-conv1d accepts it: channel-first (stride(2) == 1) as is;
    channel-last (stride(1) == 1) only with C, stride(0) and stride(2) multiples of 8 (else a
    compact copy: channel-last when C % 8 == 0, channel-first otherwise); any other layout
    is made contiguous (as the package's Python wrapper would)."""
    B, C, L = x.shape
    if x.stride(2) == 1:
        return x
    if x.stride(1) == 1 and x.stride(2) > 1:
        if C % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0:
            return x
        if C % 8 == 0:
            return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous()


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  state: Optional[torch.Tensor] = None, activation: Optional[str] = None):
    """Returns (y, new_state); new_state is None when ``state`` is None."""
    B, C, L = x.shape
    K = weight.shape[1]
    if state is None and use_cuda_conv(x, weight, bias, activation):
        return _cc1d_fn(kernel_layout(x), weight, bias, activation=activation), None
    xp = torch.cat([state.to(x.dtype), x], dim=-1) if state is not None else F.pad(x, (K - 1, 0))
    # K shifted multiply-adds: on CPU ~8x faster forward+backward than a grouped F.conv1d
    # (whose depthwise backward is very slow there), and the same on GPU.
    y = xp[..., K - 1:] * weight[:, K - 1:K]
    for k in range(K - 1):
        y = y + xp[..., k:k + L] * weight[:, k:k + 1]  # (B, C, L)
    if bias is not None:
        y = y + bias[:, None]
    if activation == "silu":
        y = F.silu(y)
    new_state = xp[..., xp.shape[-1] - (K - 1):].contiguous() if state is not None else None
    return y, new_state


class _ConvTokens(torch.autograd.Function):
    """y = act(sum_k xp[:, t + k] * w[k] + bias) on the left-padded input xp (B, L+K-1, C).

    Holds only xp for backward (the pre-activation is recomputed) and runs over cache-sized
    blocks of positions (``ops.blocks``): the K shifted multiply-adds, the SiLU and their
    backward then make their passes in cache instead of over the whole sequence.
    ``keep`` (B, L, K-1) or None: tap k (input t - (K-1-k)) counts only where
    ``keep[..., K-2-k]`` is 1 (same document, seqlm/ops/docs.py)."""

    @staticmethod
    def forward(ctx, xp, wt, bias, silu: bool, keep=None):
        Bsz, Lp, C = xp.shape
        K = wt.shape[0]
        L = Lp - K + 1
        y = xp.new_empty(Bsz, L, C)
        for sl in ops.blocks(L, Bsz * C):
            a = _conv_block(xp, wt, bias, sl, out=y[:, sl], keep=keep)
            if silu:
                F.silu(a, inplace=True)
        ctx.save_for_backward(xp, wt, bias, keep)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, gy):
        xp, wt, bias, keep = ctx.saved_tensors
        # a strided gradient (H3's kv permute hands one back) makes every per-tap pass ~3x slower
        gy = gy.contiguous()
        Bsz, Lp, C = xp.shape
        K = wt.shape[0]
        L = Lp - K + 1
        gxp = torch.zeros_like(xp)
        gw = torch.zeros_like(wt)
        gb = None if bias is None else torch.zeros_like(bias)
        for sl in ops.blocks(L, Bsz * C):
            ga = gy[:, sl]
            if ctx.silu:
                ga = torch.ops.aten.silu_backward(ga, _conv_block(xp, wt, bias, sl, keep=keep))
            if gb is not None:
                gb += ga.sum((0, 1))
            n = sl.stop - sl.start
            for k in range(K):
                xs = xp[:, sl.start + k:sl.start + k + n]
                gk = ga if (keep is None or k == K - 1) else ga * keep[:, sl, K - 2 - k, None]
                gw[k] += torch.linalg.vecdot(gk.reshape(-1, C), xs.reshape(-1, C), dim=0)
                gxp[:, sl.start + k:sl.start + k + n].addcmul_(gk, wt[k])
        return gxp, gw, gb, None, None


def _conv_block(xp, wt, bias, sl, out=None, keep=None):
    """Pre-activation of output positions ``sl`` (B, n, C), written to ``out`` if given."""
    K, n = wt.shape[0], sl.stop - sl.start
    last = xp[:, sl.start + K - 1:sl.stop + K - 1]
    if bias is None:
        a = torch.mul(last, wt[K - 1], out=out)
    else:  # the bias joins the first multiply-add (one pass fewer)
        a = torch.addcmul(bias, last, wt[K - 1], out=out)
    for k in range(K - 1):
        xs = xp[:, sl.start + k:sl.start + k + n]
        if keep is not None:  # drop inputs of an earlier document
            xs = xs * keep[:, sl, K - 2 - k, None]
        a.addcmul_(xs, wt[k])
    return a


@ops.no_autocast
def causal_conv1d_tokens(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         state: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                         seq_idx: Optional[torch.Tensor] = None):
    """Token-major form: x (B, L, C) -> (y (B, L, C), new_state), state (B, C, K-1) as above.

    The blocks' projections produce (B, L, C); shifting along L in this layout needs no
    transposes (``x`` may be a strided slice of a wider projection). ``seq_idx`` (B, L):
    output t reads only inputs of its own document (the state counts as document 0); the new
    state is the last K-1 inputs of the window's last document (zeros for earlier documents'
    positions), which a later call continues as its document 0."""
    cuda = state is None and use_cuda_conv(x, weight, bias, activation)
    if seq_idx is not None and not cuda:
        return _conv_tokens_docs(x, weight, bias, state, activation, seq_idx)
    if cuda and seq_idx is not None:  # causal-conv1d takes seq_idx on channel-last input
        y = _cc1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx.to(torch.int32), activation=activation)
        return y.transpose(1, 2), None
    if cuda:
        y, st = causal_conv1d(x.transpose(1, 2), weight, bias, state, activation)
        return y.transpose(1, 2), st
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    K = weight.shape[1]
    if use_fft_conv(K, x.shape[1]):
        return _conv_tokens_fft(x, weight, bias, state, activation, None)
    xp = F.pad(x, (0, 0, K - 1, 0)) if state is None else torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)
    # (K, C) contiguous: a strided per-tap weight row makes every multiply-add ~6x slower
    y = _ConvTokens.apply(xp, weight.t().contiguous(), bias, activation == "silu")
    new_state = None if state is None else xp[:, xp.shape[1] - (K - 1):].transpose(1, 2).contiguous()
    return y, new_state


def _conv_tokens_docs(x, weight, bias, state, activation, seq_idx):
    from seqlm.ops.docs import same_doc_back

    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    K = weight.shape[1]
    if use_fft_conv(K, x.shape[1]):  # per document by fft_conv_docs (8 x 256 x 128, 64 taps: 1.1-1.4x
        # the stream's FFT; the plain FFT minus _subtract_cross_doc measured 1.1-1.5x)
        return _conv_tokens_fft(x, weight, bias, state, activation, seq_idx)
    xp = F.pad(x, (0, 0, K - 1, 0)) if state is None else torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)
    wt = weight.t().contiguous()
    if activation is None:  # linear: the plain conv minus what crossed a boundary (no per-tap mask)
        y = _ConvTokens.apply(xp, wt, bias, False)
        y = _subtract_cross_doc(y, xp, wt, seq_idx)
    else:
        keep = torch.stack([same_doc_back(seq_idx, j) for j in range(1, K)], -1).to(x.dtype)  # (B, L, K-1)
        y = _ConvTokens.apply(xp, wt, bias, activation == "silu", keep)
    new_state = None
    if state is not None:
        docs = F.pad(seq_idx, (K - 1, 0))[:, -(K - 1):]                      # (B, K-1), state: doc 0
        last = (docs == seq_idx[:, -1:]).to(x.dtype)[:, None, :]
        new_state = (xp[:, xp.shape[1] - (K - 1):].transpose(1, 2) * last).contiguous()
    return y, new_state


def _subtract_cross_doc(y, xp, wt, seq_idx):
    """y (B, L, C) the plain causal conv of xp (B, L+K-1, C, left-padded) with taps wt (K, C)
    -> the conv restarted at each document of ``seq_idx``. Only the K-1 outputs after a
    boundary s read an earlier document: what output s + i took from before s is the full
    convolution of the K-1 inputs before s, X (K-1, C), with the taps, at lag K-1+i. That is
    computed for every boundary at once by FFT (length 2K) and subtracted up to the next
    boundary: ~ (boundaries) * K log K * C work instead of a mask multiply per tap and position
    (what the ``keep`` path does; 2.2x the plain conv for H3's 64 taps)."""
    from seqlm.ops.docs import doc_starts

    B, L, C = y.shape
    K = wt.shape[0]
    r, s = doc_starts(seq_idx).nonzero(as_tuple=True)                  # boundaries (row, position)
    if K == 1 or r.numel() == 0:
        return y
    dev = y.device
    ar = torch.arange(K - 1, device=dev)
    X = xp.reshape(-1, C).index_select(0, ((r * xp.shape[1] + s)[:, None] + ar).reshape(-1))
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    # FFTs along the last dim (a strided FFT dim is several times slower)
    Xc = X.view(-1, K - 1, C).transpose(1, 2).contiguous().to(work)   # (nb, C, K-1)
    W = torch.fft.rfft(wt.t().flip(1).to(work), n=2 * K)              # (C, K+1): taps by distance
    c = torch.fft.irfft(torch.fft.rfft(Xc, n=2 * K) * W, n=2 * K)[..., K - 1:2 * K - 2]  # (nb, C, K-1)
    c = c.transpose(1, 2).to(y.dtype)                                  # (nb, K-1, C)
    # output s + i lies in the boundary's document while it is before the next boundary
    nxt = torch.full((B, L), L, device=dev, dtype=torch.long)
    nxt[r, s] = s
    nxt = nxt.flip(1).cummin(1).values.flip(1)                         # (B, L): first boundary >= t
    after = torch.where(s + 1 < L, nxt[r, (s + 1).clamp(max=L - 1)], L)  # the next boundary after s
    t = s[:, None] + ar                                                # (nb, K-1)
    ok = t < after[:, None]
    pos = (r[:, None] * L + t)[ok]
    return y.reshape(B * L, C).index_add(0, pos, c[ok], alpha=-1).view(B, L, C)


FFT_MIN_TAPS = 32       # long kernels (H3's shift SSM: d_state = 64 taps) ...
FFT_TAPS_PER_LOG2_LEN = 4  # ... while K >= 4 log2(L): 64 taps up to L = 65536, 32 taps up to 256


def use_fft_conv(K: int, L: int) -> bool:
    """The K shifted multiply-adds cost ~K passes over the activations (about 2K more in
    backward); an FFT convolution costs O(log L) per element whatever K, so the FFT pays
    while K exceeds a multiple of log2(L). Measured on CPU (1 thread, forward+backward, with
    fft_conv's own backward): 64 taps, C = 256, the FFT takes 0.83 / 0.52 / 0.76 / 1.05x the
    loop's time at L = 2k / 4k / 8k / 32k, and 0.2-0.45x at L <= 256 (batch 64); 32 taps:
    0.5-0.8x at L <= 256, 1.2x at 4k and 2x at 32k; a few taps: the loop, always."""
    return K >= FFT_MIN_TAPS and K >= FFT_TAPS_PER_LOG2_LEN * math.log2(max(L, 2))


def _conv_tokens_fft(x, weight, bias, state, activation, seq_idx):
    """causal_conv1d_tokens through seqlm.ops.fftconv (same contract): the taps reversed are
    the convolution kernel by lag; a carried state is prepended as document 0's inputs."""
    from seqlm.ops.fftconv import fft_conv, fft_conv_docs

    B, L, C = x.shape
    K = weight.shape[1]
    xp = x if state is None else torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, S, C)
    S = xp.shape[1]
    k = weight.flip(-1)[:, :S]
    k = F.pad(k, (0, S - k.shape[1])).to(x.dtype)                                   # (C, S): k[c, lag]
    u = xp.transpose(1, 2)                                                          # (B, C, S)
    if seq_idx is None:
        y = fft_conv(u, k)
    else:
        si = seq_idx if state is None else F.pad(seq_idx, (K - 1, 0))               # the state: document 0
        y = fft_conv_docs(u, k, None, si)
    y = y[..., S - L:].transpose(1, 2)                                              # (B, L, C)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation == "silu":
        y = F.silu(y)
    new_state = None
    if state is not None:
        new_state = xp[:, S - (K - 1):].transpose(1, 2)
        if seq_idx is not None:  # only the window's last document carries on
            docs = F.pad(seq_idx, (K - 1, 0))[:, -(K - 1):]
            new_state = new_state * (docs == seq_idx[:, -1:]).to(x.dtype)[:, None, :]
        new_state = new_state.contiguous()
    return y, new_state


def causal_conv1d_step(x_t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       state: torch.Tensor, activation: Optional[str] = None):
    """One token: x_t (B, C), state (B, C, K-1) -> (y_t (B, C), new_state)."""
    full = torch.cat([state, x_t[..., None]], dim=-1)  # (B, C, K)
    y = (full * weight).sum(-1)
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return y, full[..., 1:].contiguous()


def causal_conv1d_ref(x, weight, bias=None, activation=None, seq_idx=None):
    """Obvious loop reference: y[:, c, t] = sum_k w[c, k] * x[:, c, t-K+1+k] (with ``seq_idx``
    (B, L): only over inputs s of t's document)."""
    B, C, L = x.shape
    K = weight.shape[1]
    y = torch.zeros_like(x)
    for t in range(L):
        for k in range(K):
            s = t - K + 1 + k
            if s >= 0:
                same = 1.0 if seq_idx is None else (seq_idx[:, s] == seq_idx[:, t]).to(x.dtype)[:, None]
                y[:, :, t] += weight[:, k] * x[:, :, s] * same
    if bias is not None:
        y = y + bias[:, None]
    return F.silu(y) if activation == "silu" else y
