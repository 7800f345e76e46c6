"""Long causal convolutions via FFT (H3 training/prefill) and the diagonal-SSM kernel.

``fft_conv(u, k, D)``: y[..., t] = sum_{s<=t} k[..., t-s] u[..., s] + D u[..., t], computed with
rfft/irfft padded to 2L (no wrap-around), O(L log L), in fp32 (fp64 for fp64 inputs).
``diag_ssm_kernel(log_a, w, L)``: K[c, l] = 2 Re(sum_n w[c, n] exp(log_a[c, n] * l)), the
kernel of a diagonal complex SSM, built as one batched matmul over sqrt(L)-sized blocks so
memory stays near O(C * L) instead of O(C * N * L).
``fft_conv_docs(u, k, D, seq_idx)``: the same convolution restarted at every document of a
packed window (seqlm/ops/docs.py): each document is convolved on its own. Documents are
gathered into batches by length bucket (half octaves: at most 50% padding), so the cost
stays O(L log L) per window whatever the number of documents.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STEPS = 1  # fft_conv_docs buckets: 2^STEPS sizes per octave
# The fixed cost of one bucket's FFT convolution (~10 ops forward, more backward) in units
# of its per-document work, channels * 2n * log2(2n): fitted on 1 thread (Xeon), ~0.1 ms
# per call against ~0.29 ms per million units. Buckets merge where that saves time.
FFT_CALL_COST = 350_000


def fft_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, C, L) real, k (C, L) real, D (C,) -> (B, C, L)."""
    L = u.shape[-1]
    if L == 0:
        return u * 0
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    y = _FFTConv.apply(u.to(work), k.to(work), None if D is None else D.to(work))
    return y.to(u.dtype)


class _FFTConv(torch.autograd.Function):
    """y = irfft(rfft(u) rfft(k))[:L] + D u with a hand-written backward: the gradients are
    correlations, irfft(rfft(g) conj(rfft(k))) for u and irfft(sum_b rfft(g) conj(rfft(u)))
    for k (zero padding to 2L keeps them exact), so backward is one rfft and two irffts
    (one of them per channel only) instead of autograd's complex-to-complex transforms of
    every intermediate: H3's FFT convolutions ran ~1.5x faster forward + backward."""

    @staticmethod
    def forward(ctx, u, k, D):
        L = u.shape[-1]
        n = 2 * L
        uf = torch.fft.rfft(u, n=n)                                  # (B, C, L+1)
        kf = torch.fft.rfft(k, n=n)                                  # (C, L+1)
        y = torch.fft.irfft(uf * kf, n=n)[..., :L]
        y = y.contiguous() if D is None else y + u * D[:, None]  # not a view: callers may write into it
        ctx.save_for_backward(uf, kf, u if D is not None else None, D)
        ctx.k_len = k.shape[-1]
        return y

    @staticmethod
    def backward(ctx, g):
        uf, kf, u, D = ctx.saved_tensors
        L = g.shape[-1]
        n = 2 * L
        gf = torch.fft.rfft(g, n=n)
        gu = gk = gD = None
        if ctx.needs_input_grad[0]:
            gu = torch.fft.irfft(gf * kf.conj(), n=n)[..., :L]
            if D is not None:
                gu = gu + g * D[:, None]
        if ctx.needs_input_grad[1]:
            C = kf.shape[0]
            cross = (gf * uf.conj()).reshape(-1, C, gf.shape[-1]).sum(0)  # (C, L+1)
            gk = torch.fft.irfft(cross, n=n)[..., :min(ctx.k_len, n)]
            if ctx.k_len > n:  # taps past 2L never reach an output
                gk = F.pad(gk, (0, ctx.k_len - n))
        if D is not None and ctx.needs_input_grad[2]:
            gD = (g * u).reshape(-1, D.shape[0], L).sum((0, 2))
        return gu, gk, gD


def fft_conv_docs(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None, seq_idx: torch.Tensor) -> torch.Tensor:
    """u (B, C, L), k (C, L), D (C,), seq_idx (B, L) -> (B, C, L): y[t] sums only over inputs
    of t's document.

    One gather lays the documents out bucket after bucket, each bucket a (m, n) block of m
    documents right-padded to n tokens (causal: the padding, any tokens, never reaches a real
    output); the real outputs are gathered back in token order. When the rows' first
    documents hold most tokens, the plain convolution of each row (exact up to its first
    boundary) is kept and only the later documents are convolved on their own."""
    from seqlm.ops.docs import bucket_layout, from_slots, segments, slot_of, to_slots

    B, C, L = u.shape
    starts, lens = segments(seq_idx)                             # over the flattened B*L tokens
    later = starts % L != 0                                      # documents not first in their row
    y = None
    if int(lens[later].sum()) * 2 < B * L:  # mostly first documents: plain conv, redo the rest
        y = fft_conv(u, k, D)                                    # exact up to each row's first boundary
        if not bool(later.any()):
            return y
        starts, lens = starts[later], lens[later]
    merge = (lambda n: C * 2 * n * math.log2(2 * n), FFT_CALL_COST)  # noqa: E731
    src, dst, buckets = bucket_layout(starts, lens, B * L, STEPS, merge)
    src, dst = src.to(u.device), dst.to(u.device)
    if y is None:
        inv = slot_of(src, dst, B * L)
        g = to_slots(u.transpose(1, 2).reshape(B * L, C), src, inv)  # (P, C), documents in buckets
    else:  # a few documents: gathered from u as it lies, no copy of the whole window
        g = u.transpose(1, 2)[src // L, src % L]
    outs = []
    for (m, n), seg in zip(buckets, g.split([m * n for m, n in buckets])):  # split: no zero-filled grads
        outs.append(fft_conv(seg.view(m, n, C).transpose(1, 2), k[:, :n], D).transpose(1, 2).reshape(m * n, C))
    if y is None:  # every document was convolved: the outputs back in token order
        return from_slots(torch.cat(outs), inv).view(B, L, C).transpose(1, 2)
    tok = src[dst]
    # y is fresh (fft_conv saves no output): overwrite the later documents in place
    y.transpose(1, 2).index_put_((tok // L, tok % L), torch.cat(outs)[dst])
    return y


def fft_conv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None,
                 seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Direct O(L^2) causal sum (with ``seq_idx``: over inputs of the same document only)."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        for s in range(t + 1):
            same = 1.0 if seq_idx is None else (seq_idx[:, s] == seq_idx[:, t]).to(u.dtype)[:, None]
            y[..., t] += k[..., t - s] * u[..., s] * same
    if D is not None:
        y = y + u * D[:, None]
    return y


def diag_ssm_kernel(log_a: torch.Tensor, w: torch.Tensor, L: int, block: int | None = None) -> torch.Tensor:
    """log_a, w (C, N) complex -> K (C, L) real.

    Two-level Vandermonde: l = j * Q + r, so a^l = a^{jQ} a^r and
    K[:, jQ + r] = 2 Re((w a^{jQ}) @ a^r): one batched matmul (C, L/Q, N) @ (C, N, Q) with
    Q ~ sqrt(L). Memory O(C (N sqrt(L) + L)) instead of O(C N L), forward and backward.
    """
    real = torch.float64 if log_a.dtype == torch.complex128 else torch.float32
    if L == 0:
        return w.real[:, :0].to(real)  # (C, 0)
    Q = block or max(16, 1 << math.ceil(math.log2(math.sqrt(L))))
    Q = min(Q, L)
    nb = -(-L // Q)
    r = torch.arange(Q, device=log_a.device, dtype=real)
    j = torch.arange(nb, device=log_a.device, dtype=real) * Q
    base = torch.exp(log_a[..., None] * r)  # (C, N, Q): a^r
    W = (w[..., None] * torch.exp(log_a[..., None] * j)).transpose(1, 2)  # (C, nb, N): w a^{jQ}
    K = 2 * torch.bmm(W, base).real  # (C, nb, Q)
    return K.reshape(K.shape[0], nb * Q)[:, :L]


def diag_ssm_kernel_ref(a_bar: torch.Tensor, w: torch.Tensor, L: int) -> torch.Tensor:
    """Explicit powers: K[c, l] = 2 Re(sum_n w a_bar^l), a_bar = exp(log_a)."""
    p = torch.ones_like(a_bar)
    ks = []
    for _ in range(L):
        ks.append(2 * (w * p).sum(-1).real)
        p = p * a_bar
    return torch.stack(ks, dim=-1)
