"""Long causal convolutions via FFT (H3 training/prefill) and the diagonal-SSM kernel.

``fft_conv(u, k, D)``: y[..., t] = sum_{s<=t} k[..., t-s] u[..., s] + D u[..., t], computed with
rfft/irfft padded to 2L (no wrap-around), O(L log L), in fp32 (fp64 for fp64 inputs).
``diag_ssm_kernel(log_a, w, L)``: K[c, l] = 2 Re(sum_n w[c, n] exp(log_a[c, n] * l)), the
kernel of a diagonal complex SSM, built as one batched matmul over sqrt(L)-sized blocks so
memory stays near O(C * L) instead of O(C * N * L).
"""
from __future__ import annotations

import math

import torch


def fft_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, C, L) real, k (C, L) real, D (C,) -> (B, C, L)."""
    L = u.shape[-1]
    if L == 0:
        return u * 0
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    n = 2 * L
    uf = torch.fft.rfft(u.to(work), n=n)
    kf = torch.fft.rfft(k.to(work), n=n)
    y = torch.fft.irfft(uf * kf, n=n)[..., :L]
    if D is not None:
        y = y + u.to(work) * D.to(work)[:, None]
    return y.to(u.dtype)


def fft_conv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Direct O(L^2) causal sum."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        for s in range(t + 1):
            y[..., t] += k[..., t - s] * u[..., s]
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
