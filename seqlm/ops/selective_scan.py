"""Mamba-1 selective scan: chunked, linear in L, memory-lean backward, O(1) step.

Per channel d and state n (Gu & Dao 2023):
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]          (then y *= silu(z_t[d]))
Shapes (token-major, like the block's activations):
    u, delta, z (b, L, Dm);  A (Dm, N);  B, C (b, L, N);  D, delta_bias (Dm,);
    h0 / h_last (b, Dm, N).
``delta`` is raw: ``delta = softplus(delta + delta_bias)`` when ``delta_softplus``.

The CPU kernel (``_ScanFn``) walks L in chunks of Q tokens and carries h between them.
Inside a chunk the decays exp(delta A), inputs delta B u and readout C are batched tensors of
(Q, b, Dm, N); the recurrence itself is one in-place ``addcmul`` per token over (b, Dm, N).
Measured on CPU fp32 (Dm=512, N=16) this beats a log-depth (Hillis-Steele) scan and a
two-level scan by 2-6x: they do log Q or 2-3 extra passes over memory, and one pass per
token is already at memory bandwidth. It only multiplies by decays <= 1 (no exp(-cumsum)),
so it is stable in fp32 for any delta. The (b, Dm, L, N) tensor of all states is never
built: forward keeps only the state at each chunk start ((L/Q) x b x Dm x N); backward walks
the chunks in reverse, recomputes one chunk's states from its start state and runs the
adjoint recurrence g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1} - so memory is linear in L
with a constant of a few (b, L, Dm) tensors plus (L/Q) states.

Documents (``seq_idx`` (b, L), seqlm/ops/docs.py): at the first token of a new document the
decay exp(delta A) is replaced by 0, so h restarts from delta B u; the backward needs nothing
else (the adjoint recurrence and d/d(delta A) both pass through the zeroed decay).

On CUDA with mamba-ssm importable (no initial state, no seq_idx) ``selective_scan_fn`` is used.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional CUDA fast path
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _ssfn  # type: ignore
except Exception:  # noqa: BLE001
    _ssfn = None

LOG2E = 1.4426950408889634
DEFAULT_CHUNK = 64  # fits the per-chunk (Q, b, Dm, N) buffers in cache for Dm*N ~ 8k


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_STATE = 256  # csrc/selective_scan/selective_scan.cpp: dstate <= 256


def _use_cuda_kernel(*tensors: Tensor) -> bool:
    """True when mamba-ssm's selective_scan_fn imports and every tensor lives on CUDA."""
    return _ssfn is not None and all(t.is_cuda for t in tensors)


def _cuda_kernel_takes(u: Tensor, A: Tensor) -> bool:
    """The kernel's contract beyond the device: fp32/fp16/bf16 input, a real A with at most
    256 states (the other dtypes are matched in :func:`_cuda_args`)."""
    return u.dtype in KERNEL_DTYPES and not A.is_complex() and A.shape[1] <= KERNEL_MAX_STATE


def _cuda_args(u, delta, A, B, C, D, z, delta_bias):
    """Arguments as selective_scan_fn's checks want them: delta, B, C, z in u's dtype (the
    input type), A, D and the delta bias in fp32 (the weight type; D and bias must be fp32);
    u, delta, z (b, Dm, L) and B, C (b, N, L) with the last stride 1 (the wrapper would copy)."""
    it = u.dtype
    f = lambda t: None if t is None else t.float()  # noqa: E731
    ch = lambda t: None if t is None else t.to(it).transpose(1, 2).contiguous()  # noqa: E731
    return ch(u), ch(delta), A.float(), ch(B), ch(C), f(D), ch(z), f(delta_bias)


def _chunk_states(dA: Tensor, dBu: Tensor, h: Tensor) -> Tensor:
    """h_t = dA_t h_{t-1} + dBu_t for t < Q; dA, dBu (Q, b, Dm, N), h (b, Dm, N) -> hs (Q, ...)."""
    hs = torch.empty_like(dBu)
    for a_t, b_t, h_t in zip(dA.unbind(0), dBu.unbind(0), hs.unbind(0)):
        h = torch.addcmul(b_t, a_t, h, out=h_t)
    return hs


def _chunk_inputs(u, delta, A2, B, keep=None):
    """(Q, b, Dm) u, delta; A2 = A log2(e); (Q, b, N) B -> decays dA = exp(delta A) and
    inputs dBu = delta u B, both (Q, b, Dm, N). (exp2 is ~3x faster than exp on CPU.)
    ``keep`` (Q, b): 0 at a document's first token (its decay becomes 0: a state reset)."""
    dA = torch.exp2(delta[..., None] * A2)
    if keep is not None:
        dA.mul_(keep[:, :, None, None])
    dBu = (delta * u)[..., None] * B[:, :, None, :]
    return dA, dBu


def _delta(raw, bias, softplus: bool):
    d = raw if bias is None else raw + bias
    return F.softplus(d) if softplus else d


class _ScanFn(torch.autograd.Function):
    """The whole selective scan incl. delta bias/softplus, D skip and SiLU(z) gate, so that
    only its inputs are saved (the per-chunk pieces are recomputed in backward).
    Inner layout is time-major: u, delta (raw), z (L, b, Dm), B, C (L, b, N), h0 (b, Dm, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, D, z, bias, softplus: bool, Q: int, keep=None):
        L, b, Dm = u.shape
        starts = list(range(0, L, Q))
        H = u.new_empty(len(starts), b, Dm, A.shape[1])       # state at each chunk start
        y = torch.empty_like(u)
        A2 = A * LOG2E
        h = h0
        for i, s in enumerate(starts):
            e = min(s + Q, L)
            H[i] = h
            uc = u[s:e]
            dA, dBu = _chunk_inputs(uc, _delta(delta[s:e], bias, softplus), A2, B[s:e],
                                    None if keep is None else keep[s:e])
            hs = _chunk_states(dA, dBu, h)                     # (q, b, Dm, N)
            yc = torch.einsum("qbdn,qbn->qbd", hs, C[s:e])
            if D is not None:
                yc.addcmul_(uc, D)
            if z is not None:
                yc.mul_(F.silu(z[s:e]))
            y[s:e] = yc
            h = hs[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, H, D, z, bias, keep)
        ctx.Q, ctx.softplus = Q, softplus
        return y, h

    @staticmethod
    def backward(ctx, gy, gh_last):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        with torch.autocast(saved[0].device.type, enabled=False):  # fp32, like forward
            return _ScanFn._backward(ctx, saved, gy, gh_last)

    @staticmethod
    def _backward(ctx, saved, gy, gh_last):
        u, delta, A, B, C, H, D, z, bias, keep = saved
        Q, softplus = ctx.Q, ctx.softplus
        L, b, Dm = u.shape
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        gD = None if D is None else torch.zeros_like(D)
        gz = None if z is None else torch.empty_like(z)
        gbias = None if bias is None else torch.zeros_like(bias)
        if gy is None:
            gy = torch.zeros_like(u)
        A2 = A * LOG2E
        g = gh_last if gh_last is not None else H.new_zeros(H.shape[1:])  # dL/dh at chunk end
        for i in range(len(H) - 1, -1, -1):
            s = i * Q
            e = min(s + Q, L)
            uc, Bc, Cc, gyc = u[s:e], B[s:e], C[s:e], gy[s:e]
            dc = _delta(delta[s:e], bias, softplus)
            dA, dBu = _chunk_inputs(uc, dc, A2, Bc, None if keep is None else keep[s:e])
            hs = _chunk_states(dA, dBu, H[i])
            if z is not None:  # out = y * silu(z), y = C.h + D u
                zc = z[s:e]
                sig = torch.sigmoid(zc)
                yc = torch.einsum("qbdn,qbn->qbd", hs, Cc)
                if D is not None:
                    yc.addcmul_(uc, D)
                gz[s:e] = gyc * yc * sig * (1 + zc * (1 - sig))
                gyc = gyc * zc * sig
            if D is not None:
                gD += (gyc * uc).sum((0, 1))
            # gC_t[n] = sum_d gy_t[d] h_t[d, n]
            torch.matmul(gyc[:, :, None, :], hs, out=gC[s:e, :, None, :])
            # adjoint recurrence, in place over C gy: g_t = C_t gy_t + dA_{t+1} g_{t+1}
            gh = gyc[..., None] * Cc[:, :, None, :]            # (q, b, Dm, N)
            gh[-1] += g
            ghs, dAs = gh.unbind(0), dA.unbind(0)
            for t in range(e - s - 2, -1, -1):
                ghs[t].addcmul_(dAs[t + 1], ghs[t + 1])
            g = dA[0] * gh[0]                                   # dL/dh at this chunk's start
            # through dA = exp(delta A): dL/d(delta A) = g_t * dA_t * h_{t-1} = g_t (h_t - dBu_t)
            gdA = hs.sub_(dBu).mul_(gh)
            gdel = (gdA * A).sum(-1)                            # (q, b, Dm)
            gA += gdA.mul_(dc[..., None]).sum((0, 1))
            # through dBu = (delta u) B
            gdu = torch.einsum("qbdn,qbn->qbd", gh, Bc)         # (q, b, Dm)
            torch.matmul((dc * uc)[:, :, None, :], gh, out=gB[s:e, :, None, :])
            torch.mul(gdu, dc, out=gu[s:e])
            if D is not None:
                gu[s:e].addcmul_(gyc, D)
            gdel.addcmul_(gdu, uc)
            if softplus:  # softplus' = sigmoid
                gdel.mul_(torch.sigmoid(delta[s:e] if bias is None else delta[s:e] + bias))
            gdelta[s:e] = gdel
            if bias is not None:
                gbias += gdel.sum((0, 1))
        return gu, gdelta, gA, gB, gC, g, gD, gz, gbias, None, None, None


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
                   h0: Optional[Tensor] = None, chunk: int = DEFAULT_CHUNK,
                   seq_idx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Selective scan over the whole sequence. Returns (y (b, L, Dm), h_last (b, Dm, N)).
    ``seq_idx`` (b, L): reset the state at each document start (h0 feeds document 0)."""
    if chunk <= 0:
        raise ValueError(f"selective_scan: chunk must be > 0, got {chunk}")
    b, L, Dm = u.shape
    N = A.shape[1]
    if delta.shape != u.shape or A.shape[0] != Dm or B.shape != (b, L, N) or C.shape != (b, L, N):
        raise ValueError(f"selective_scan: shapes u {tuple(u.shape)}, delta {tuple(delta.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} do not agree")
    if h0 is None and seq_idx is None and _use_cuda_kernel(u, delta, B, C) and _cuda_kernel_takes(u, A):
        cu, cd, cA, cB, cC, cD, cz, cb = _cuda_args(u, delta, A, B, C, D, z, delta_bias)
        y, h_last = _ssfn(cu, cd, cA, cB, cC, cD, cz, cb, delta_softplus, return_last_state=True)
        return y.transpose(1, 2), h_last.to(u.dtype)
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    tm = lambda t: t.transpose(0, 1).to(work).contiguous()  # noqa: E731  (b, L, .) -> (L, b, .)
    if h0 is None:
        h0 = u.new_zeros(b, Dm, N, dtype=work)
    opt = lambda t: None if t is None else t.to(work)  # noqa: E731
    keep = None
    if seq_idx is not None:
        from seqlm.ops.docs import doc_starts

        keep = (~doc_starts(seq_idx)).t().to(work).contiguous()          # (L, b)
    # fp32 inside, autocast or not: autocast would run the forward's einsum/matmul in bf16 while
    # the backward (never under autocast) runs in fp32
    with torch.autocast(u.device.type, enabled=False):
        yT, h_last = _ScanFn.apply(tm(u), tm(delta), A.to(work), tm(B), tm(C), h0.to(work), opt(D),
                                   None if z is None else tm(z), opt(delta_bias), delta_softplus, chunk, keep)
    y = yT.transpose(0, 1).to(u.dtype)
    return y, h_last.to(u.dtype)


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor,
                        D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                        delta_bias: Optional[Tensor] = None,
                        delta_softplus: bool = True) -> tuple[Tensor, Tensor]:
    """One token: u, delta, z (b, Dm), B, C (b, N), h (b, Dm, N) -> (y (b, Dm), new h)."""
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = F.softplus(delta)
    h = torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[:, None, :]
    y = (h @ C[..., None])[..., 0]
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * F.silu(z)
    return y, h


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       h0=None, chunk=None, seq_idx=None):
    """Obvious sequential recurrence, one token at a time (tests only; ``chunk`` ignored);
    with ``seq_idx`` the state is zeroed before each document's first token."""
    b, L, Dm = u.shape
    h = u.new_zeros(b, Dm, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            h = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None], torch.zeros_like(h), h)
        y, h = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], h, D,
                                   None if z is None else z[:, t], delta_bias, delta_softplus)
        ys.append(y)
    return torch.stack(ys, 1), h
