"""Mamba-2 state-space duality (SSD) kernel: chunked scan, O(1) step, materialised matrix.

Per head h (H heads of width P, state N, group g = h // (H/G) for B and C):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          # (P, N)
    y_t = h_t C_t + D x_t                               # (P,)
Shapes: x (b, L, H, P), dt (b, L, H) (softplus'ed, bias added), A (H,) < 0,
B, C (b, L, G, N), D (H,), states h0 / h_last (b, H, P, N).

``ssd_scan`` is the chunked algorithm (Dao & Gu 2024): quadratic only inside a chunk of Q
tokens, chunk states passed by a linear loop over the L/Q chunks (a custom autograd
function with a reverse loop for the backward). Time and memory are linear in L. On CUDA
with mamba-ssm importable it calls ``mamba_chunk_scan_combined`` instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional CUDA/Triton fast path
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mcsc  # type: ignore
except Exception:  # noqa: BLE001
    _mcsc = None


def use_triton_ssd(*tensors) -> bool:
    """True when mamba-ssm's fused kernel imports and every tensor lives on CUDA."""
    return _mcsc is not None and all(t.is_cuda for t in tensors)


def _segsum_exp(cum: Tensor) -> Tensor:
    """cum (..., Q) cumulative log-decays -> (..., Q, Q) with [i, j] = exp(cum_i - cum_j) for
    j <= i and 0 above the diagonal (masked before exp, so nothing overflows)."""
    Q = cum.shape[-1]
    seg = cum[..., :, None] - cum[..., None, :]
    upper = torch.ones(Q, Q, dtype=torch.bool, device=cum.device).triu(1)
    return seg.masked_fill_(upper, float("-inf")).exp_()


# -------------------------------------------------------------------------------------
# Layouts inside the chunked kernel (c = chunk, Q = position in chunk, Hg = heads per group):
#   token-major  (b, c, Q, H, P)    x, u = dt x, outputs
#   head-major   (b, c, H, Q, P)    operand of the per-head Q x Q products
#   states       (b, c, G, N, Hg*P) "N-major", so C @ S and B^T @ u fold all heads of a
#                                   group into one matrix product per chunk
class _SSDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, Q: int):
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        nc, Hg = L // Q, H // G
        cumT = (dt * A).view(b, nc, Q, H).transpose(2, 3).contiguous().cumsum(-1)  # (b, c, H, Q)
        cum = cumT.transpose(2, 3)                                     # (b, c, Q, H) view
        Bc = B.view(b, nc, Q, G, N).transpose(2, 3).contiguous()       # (b, c, G, Q, N)
        Cc = C.view(b, nc, Q, G, N).transpose(2, 3).contiguous()
        # (1) intra-chunk: y_i = sum_{j<=i} (C_i.B_j) exp(cum_i - cum_j) u_j
        CB = Cc @ Bc.mT                                                # (b, c, G, Q, Q)
        M = (_segsum_exp(cumT).view(b, nc, G, Hg, Q, Q) * CB[:, :, :, None]).view(b, nc, H, Q, Q)
        u = x.view(b, nc, Q, H, P) * dt.view(b, nc, Q, H, 1)           # token-major
        y = (M @ u.transpose(2, 3)).transpose(2, 3)                    # (b, c, Q, H, P) view
        del M  # the H x Q x Q decay-weighted mixing matrices are recomputed in backward
        # (2) chunk-local final states: s = sum_j exp(cum_Q - cum_j) B_j^T u_j
        w = (cum[:, :, -1:] - cum).exp_()                              # (b, c, Q, H)
        v = (u * w[..., None]).reshape(b, nc, Q, G, Hg * P).transpose(2, 3)
        s = Bc.mT @ v                                                  # (b, c, G, N, Hg*P)
        # (3) pass states: S_in[c] = a_{c-1} S_in[c-1] + s[c-1], a linear loop over chunks
        a = cumT[..., -1].exp().reshape(b, nc, G, 1, Hg, 1)               # chunk decays
        S = torch.empty_like(s).view(b, nc, G, N, Hg, P)
        s6 = s.view(b, nc, G, N, Hg, P)
        S[:, 0] = h0.reshape(b, G, Hg, P, N).permute(0, 1, 4, 2, 3)
        for c in range(1, nc):
            torch.addcmul(s6[:, c - 1], S[:, c - 1], a[:, c - 1], out=S[:, c])
        h_last = torch.addcmul(s6[:, -1], S[:, -1], a[:, -1])          # (b, G, N, Hg, P)
        # (4) incoming-state contribution: exp(cum_i) C_i . S_in
        y_off = (Cc @ S.view(b, nc, G, N, Hg * P)).transpose(2, 3).reshape(b, nc, Q, H, P)
        y_off *= cum.exp()[..., None]
        out = torch.add(y_off, y, out=torch.empty_like(y_off)).view(b, L, H, P)
        ctx.save_for_backward(x, dt, A, Bc, Cc, cumT, CB, w, a, S, h_last, out)
        ctx.Q = Q
        # contiguous (b, H, P, N): decode steps then run on a dense state
        return out, h_last.permute(0, 1, 3, 4, 2).contiguous().view(b, H, P, N)

    @staticmethod
    def backward(ctx, gy, gh):
        x, dt, A, Bc, Cc, cumT, CB, w, a, S, h_last, out = ctx.saved_tensors
        Q = ctx.Q
        b, L, H, P = x.shape
        nc, G, N = L // Q, Bc.shape[2], Bc.shape[4]
        Hg = H // G
        cum = cumT.transpose(2, 3)                                     # (b, c, Q, H) view
        xc, dtc = x.view(b, nc, Q, H, P), dt.view(b, nc, Q, H, 1)
        gy = gy.reshape(b, nc, Q, H, P) if gy is not None else x.new_zeros(b, nc, Q, H, P)
        # Gradient of the log-decays: exp(cum_i) (rows of Lm, y_off) gives <gy_i, out_i>;
        # exp(-cum_j) (columns of Lm, w) gives -dt_j <gu_j, x_j>; exp(cum_last) (w, a) gives
        # <dL/dS_end, S_end> per chunk. No Q x Q pass is needed for it.
        gcum = (gy * out.view(b, nc, Q, H, P)).sum(-1).contiguous()                 # (b, c, Q, H)
        # (4) y_off = exp(cum) * (C @ S_in)
        gZ = (gy * cum.exp()[..., None]).reshape(b, nc, Q, G, Hg * P).transpose(2, 3)
        gC = gZ @ S.view(b, nc, G, N, Hg * P).mT                       # (b, c, G, Q, N)
        gS = (Cc.mT @ gZ).view(b, nc, G, N, Hg, P)
        del gZ  # (the dels here bound the backward's peak memory: no full-length temporary
        # outlives its last use)
        # (3) reverse loop: gs[c] = dL/dS_end[c];  dL/dS_end[c-1] = gS[c] + a_c gs[c]
        if gh is not None:
            g = gh.reshape(b, G, Hg, P, N).permute(0, 1, 4, 2, 3).contiguous()
        else:
            g = x.new_zeros(b, G, N, Hg, P)
        gs = torch.empty_like(gS)
        gs[:, -1] = g
        for c in range(nc - 1, 0, -1):
            torch.addcmul(gS[:, c], gs[:, c], a[:, c], out=gs[:, c - 1])
        gh0 = torch.addcmul(gS[:, 0], gs[:, 0], a[:, 0]).permute(0, 1, 3, 4, 2).reshape(b, H, P, N)
        gcum[:, :-1, -1] += (gs[:, :-1] * S[:, 1:]).sum((3, 5)).view(b, nc - 1, H)
        gcum[:, -1, -1] += (gs[:, -1] * h_last).sum((2, 4)).view(b, H)
        del gS
        # (2) s = B^T v, v = w dt x
        gs5 = gs.view(b, nc, G, N, Hg * P)
        wdt = w[..., None] * dtc                                       # (b, c, Q, H, 1)
        v = (xc * wdt).reshape(b, nc, Q, G, Hg * P).transpose(2, 3)
        gB = v @ gs5.mT                                                # (b, c, G, Q, N)
        gv = (Bc @ gs5).transpose(2, 3).reshape(b, nc, Q, H, P)
        del v, gs5, gs
        # (1) y = M @ uh, M = Lm * CB (Lm, M and uh recomputed: 2 H Q + P floats per token
        # not held between forward and backward)
        Lm = _segsum_exp(cumT)                                         # (b, c, H, Q, Q)
        M = (Lm.view(b, nc, G, Hg, Q, Q) * CB[:, :, :, None]).view(b, nc, H, Q, Q)
        uh = (xc * dtc).transpose(2, 3)                                # (b, c, H, Q, P) view
        gyh = gy.transpose(2, 3).contiguous()                          # (b, c, H, Q, P)
        gM = gyh @ uh.mT                                               # (b, c, H, Q, Q)
        gu = torch.addcmul((M.mT @ gyh).transpose(2, 3), gv, w[..., None],
                           out=torch.empty_like(gv))                   # dL/du (b, c, Q, H, P)
        del M, gyh, gv
        gCB = gM.mul_(Lm).view(b, nc, G, Hg, Q, Q)                     # (b, c, G, Q, Q)
        del Lm
        gCB = gCB[:, :, :, 0] if Hg == 1 else gCB.sum(3)
        del gM
        gC += gCB @ Bc
        gB += gCB.mT @ Cc
        del gCB
        gux = (gu * xc).sum(-1)                                        # (b, c, Q, H)
        gcum -= gux * dtc[..., 0]
        # cum = cumsum(dt A) within the chunk -> reverse cumsum
        gdA = (gcum - gcum.cumsum(2) + gcum.sum(2, keepdim=True)).reshape(b, L, H)
        gx = (gu * dtc).reshape(b, L, H, P)
        gdt = gdA * A + gux.reshape(b, L, H)
        gA = (gdA * dt).sum((0, 1))
        gB = gB.transpose(2, 3).reshape(b, L, G, N)
        gC = gC.transpose(2, 3).reshape(b, L, G, N)
        return gx, gdt, gA, gB, gC, gh0, None


class _SSDIntra(torch.autograd.Function):
    """One chunk, zero initial state, final state not wanted (training on windows no longer
    than the chunk): only the intra-chunk product ``y = (L * C B^T) @ (dt x)`` is needed, which
    skips the state terms (about half the work at short training windows)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C):
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        Hg = H // G
        cumT = (dt * A).transpose(1, 2).contiguous().cumsum(-1)                  # (b, H, L)
        Bh, Ch = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, G, L, N)
        Lm = _segsum_exp(cumT)                                                    # (b, H, L, L)
        M = (Lm.view(b, G, Hg, L, L) * (Ch @ Bh.mT)[:, :, None]).view(b, H, L, L)
        uh = (x * dt[..., None]).transpose(1, 2).contiguous()                    # (b, H, L, P)
        out = (M @ uh).transpose(1, 2)                                            # (b, L, H, P)
        ctx.save_for_backward(x, dt, A, Bh, Ch, Lm, M, uh, out)
        return out

    @staticmethod
    def backward(ctx, gy):
        x, dt, A, Bh, Ch, Lm, M, uh, out = ctx.saved_tensors
        b, L, H, P = x.shape
        G = Bh.shape[1]
        Hg = H // G
        gyh = gy.transpose(1, 2).contiguous()                                     # (b, H, L, P)
        gM = gyh @ uh.mT                                                          # (b, H, L, L)
        gu = (M.mT @ gyh).transpose(1, 2)                                         # (b, L, H, P)
        # d/dcum: rows exp(cum_i) give <gy_i, out_i>, columns exp(-cum_j) give -dt_j <gu_j, x_j>
        gux = (gu * x).sum(-1)                                                    # (b, L, H)
        gcum = (gy * out).sum(-1) - gux * dt
        gCB = gM.mul_(Lm).view(b, G, Hg, L, L)
        gCB = gCB[:, :, 0] if Hg == 1 else gCB.sum(2)                             # (b, G, L, L)
        gC = (gCB @ Bh).transpose(1, 2)
        gB = (gCB.mT @ Ch).transpose(1, 2)
        gdA = gcum - gcum.cumsum(1) + gcum.sum(1, keepdim=True)                    # reverse cumsum
        gx = gu * dt[..., None]
        gdt = gdA * A + gux
        gA = (gdA * dt).sum((0, 1))
        return gx, gdt, gA, gB, gC


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
             D: Optional[Tensor] = None, h0: Optional[Tensor] = None,
             return_state: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Chunked SSD. Returns y (b, L, H, P) and the final state h_last (b, H, P, N)
    (None with ``return_state=False``, which lets a zero-state window of at most one chunk
    skip the state terms)."""
    b, L, H, P = x.shape
    G = B.shape[2]
    if H % G:
        raise ValueError(f"ssd_scan: groups G={G} must divide heads H={H}")
    if chunk_size <= 0:
        raise ValueError(f"ssd_scan: chunk_size must be > 0, got {chunk_size}")
    if use_triton_ssd(x, dt, B, C):
        y, h_last = _mcsc(x, dt, A, B, C, chunk_size, D=D, initial_states=h0, return_final_states=True)
        return y, h_last
    Q = min(chunk_size, L)
    if h0 is None and not return_state and L <= chunk_size:
        y = _SSDIntra.apply(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous())
        return (y + x * D[:, None] if D is not None else y), None
    pad = (-L) % Q
    xs, dts, Bs, Cs = x, dt, B, C
    if pad:  # padded steps have dt = 0: no input and decay 1, so h_last is unchanged
        xs, Bs, Cs = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dts = F.pad(dt, (0, 0, 0, pad))
    if h0 is None:
        h0 = x.new_zeros(b, H, P, B.shape[3])
    xs, dts, Bs, Cs = (t.contiguous() for t in (xs, dts, Bs, Cs))
    y, h_last = _SSDChunked.apply(xs, dts, A, Bs, Cs, h0, Q)
    if pad:
        y, xs = y[:, :L], xs[:, :L]
    if D is not None:  # xs: the contiguous x the scan keeps anyway (x may view a wider tensor)
        y = y + xs * D[:, None]
    return y, (h_last if return_state else None)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor,
             D: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One token: x (b, H, P), dt (b, H), B/C (b, G, N), h (b, H, P, N) -> y (b, H, P), new h.

    Decode hot path: B and C broadcast over the heads of their group (no per-head copies),
    the decay and input term fused in one addcmul; same result as ``ssd_step_ref``."""
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    Hg = H // G
    a = (dt * A).exp_().view(b, G, Hg, 1, 1)                          # decay per head
    u = (x * dt[..., None]).reshape(b, G, Hg, P, 1)                   # dt x
    h = torch.addcmul(h.reshape(b, G, Hg, P, N) * a, u, B.reshape(b, G, 1, 1, N))
    # h C per head as one (b G) batch of (Hg P, N) @ (N, 1) products (a broadcast 5-D matmul
    # is ~4x slower on CPU at decode sizes)
    y = (h.reshape(b * G, Hg * P, N) @ C.reshape(b * G, N, 1)).view(b, H, P)
    if D is not None:
        y = torch.addcmul(y, x, D[:, None])
    return y, h.reshape(b, H, P, N)


def ssd_step_ref(x, dt, A, B, C, h, D=None):
    """Obvious one-token recurrence (per-head copies of B and C)."""
    b, H, P = x.shape
    G = B.shape[1]
    Bh = B.repeat_interleave(H // G, dim=1)                           # (b, H, N)
    Ch = C.repeat_interleave(H // G, dim=1)
    a = (dt * A).exp()                                                # (b, H)
    h = h * a[..., None, None] + (x * dt[..., None])[..., None] * Bh[:, :, None]
    y = (h @ Ch[..., None])[..., 0]                                   # (b, H, P)
    if D is not None:
        y = y + x * D[:, None]
    return y, h


def ssd_ref(x, dt, A, B, C, D=None, h0=None):
    """Obvious sequential recurrence, one token at a time (tests only)."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    h = x.new_zeros(b, H, P, N) if h0 is None else h0
    ys = []
    for t in range(L):
        y, h = ssd_step_ref(x[:, t], dt[:, t], A, B[:, t], C[:, t], h, D)
        ys.append(y)
    return torch.stack(ys, 1), h


def ssd_matrix(dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None) -> Tensor:
    """The (b, H, L, L) mixing matrix T with y = T x per head (for MOHAWK distillation):
    T[l, s] = (C_l . B_s) dt_s prod_{k=s+1..l} exp(dt_k A) for s <= l, + D on the diagonal.
    (dt_s is the discretisation of B: B_bar_s = dt_s B_s.)"""
    b, L, H = dt.shape
    G = B.shape[2]
    cum = (dt * A).cumsum(1).transpose(1, 2)                          # (b, H, L)
    decay = _segsum_exp(cum)                                          # (b, H, L, L)
    CB = torch.einsum("blgn,bsgn->bgls", C, B).repeat_interleave(H // G, dim=1)
    T = CB * decay * dt.transpose(1, 2)[:, :, None, :]
    if D is not None:
        T = T + torch.diag_embed(D.to(T.dtype)[:, None].expand(b, H, L))
    return T
