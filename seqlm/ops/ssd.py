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

Documents (``seq_idx`` (b, L), seqlm/ops/docs.py) are constant masks folded into the
chunked algorithm: the intra-chunk matrix T keeps only same-document pairs, a chunk's local
final state only its last document's tokens, the incoming state reaches only the tokens of
the document it belongs to, and the chunk decay a becomes 0 when the chunk ends in another
document than it started with. The backward reuses the masked T, w, a, exp(cum) (its
derivations hold unchanged for constant masks) and masks dL/dT.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from seqlm import ops

try:  # optional CUDA/Triton fast path
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mcsc  # type: ignore
except Exception:  # noqa: BLE001
    _mcsc = None


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # Triton's tl.dot has no fp64


def use_triton_ssd(*tensors) -> bool:
    """True when mamba-ssm's fused kernel imports, every tensor lives on CUDA and has a dtype
    its Triton kernels take (the shapes are checked by :func:`ssd_scan` itself)."""
    return _mcsc is not None and all(t.is_cuda for t in tensors) and all(
        getattr(t, "dtype", torch.float32) in KERNEL_DTYPES for t in tensors)


def _segsum_exp(cum: Tensor) -> Tensor:
    """cum (..., Q) cumulative log-decays -> (..., Q, Q) with [i, j] = exp(cum_i - cum_j) for
    j <= i and 0 above the diagonal (masked before exp, so nothing overflows)."""
    Q = cum.shape[-1]
    seg = cum[..., :, None] - cum[..., None, :]
    upper = torch.ones(Q, Q, dtype=torch.bool, device=cum.device).triu(1)
    return seg.masked_fill_(upper, float("-inf")).exp_()


# -------------------------------------------------------------------------------------
# Intra-chunk product y_i = sum_{j<=i} T_ij exp(c_i - c_j) u_j  (T = tril(C B^T) per group,
# c the cumulative log-decays of the head, u = dt x).
#
# The decay factorises about a pivot r: exp(c_i - c_j) = exp(c_i - r) exp(r - c_j). With
# ep = exp(c - r) and em = exp(r - c) the product is ep * (T @ (em * u)): one matrix product
# per chunk and group over all Hg heads of the group (T is shared by them), with no per-head
# Q x Q decay matrix at all. It is exact algebra; the only risk is range: with r at the middle
# of the head's log-decays in the chunk, both factors stay within exp(+-span/2). A (block,
# head) whose span exceeds PIVOT_SPAN (fast-decaying heads: dt * |A| summed over the chunk)
# gets em = 0 there, so the fast product gives 0 for it, and its exact contribution is
# added from the masked per-head Q x Q matrix (``_segsum_exp``), as in the minimal listing.
PIVOT_SPAN = {torch.float16: 12.0}   # per dtype; others use PIVOT_SPAN_DEFAULT
PIVOT_SPAN_DEFAULT = 64.0            # factors within exp(+-32) ~ 8e13: far from fp32/bf16 limits


def _pivot(c: Tensor, blocks: list[slice]):
    """c (K, Q, H) cumulative log-decays of K chunks -> ep, em (K, Q, H) and, per block of
    chunks, the heads (LongTensor, or None) whose span in some chunk of the block exceeds the
    limit: their em is 0 throughout the block, and they take the exact per-head product."""
    hi, lo = c.amax(1, keepdim=True), c.amin(1, keepdim=True)
    over = (hi - lo)[:, 0] > PIVOT_SPAN.get(c.dtype, PIVOT_SPAN_DEFAULT)         # (K, H)
    d = c - (hi + lo) * 0.5
    if not bool(over.any()):
        return d.exp(), d.neg_().exp_(), [None] * len(blocks)
    exact, heads = torch.zeros_like(over), []
    for kb in blocks:
        hb = over[kb].any(0)
        heads.append(hb.nonzero()[:, 0] if bool(hb.any()) else None)
        exact[kb] = hb
    d.masked_fill_(exact[:, None], 0.0)
    return d.exp(), d.neg_().exp_().masked_fill_(exact[:, None], 0.0), heads


def _grouped(t: Tensor, G: int) -> Tensor:
    """token-major (n, Q, H, P) -> (n, G, Q, Hg*P): the operand of the per-group products
    (a view of a contiguous t)."""
    n, Q, H, P = t.shape
    return t.reshape(n, Q, G, (H // G) * P).transpose(1, 2)


def _tokens(t: Tensor, H: int) -> Tensor:
    """(n, G, Q, Hg*P) -> token-major (n, Q, H, P) (a view when G = 1, else a copy)."""
    n, G, Q, HgP = t.shape
    return t.transpose(1, 2).reshape(n, Q, H, HgP * G // H)


def _exact_parts(T, cumT, xb, dtb, hb):
    """Per-head Q x Q matrices of the heads hb: Lm (decays, 0 above the diagonal), M = Lm T,
    and u = dt x head-major (n, m, Q, P)."""
    Hg = xb.shape[2] // T.shape[1]
    Lm = _segsum_exp(cumT[:, hb])                                      # (n, m, Q, Q)
    M = Lm * T[:, hb // Hg]
    u = (xb[:, :, hb] * dtb[:, :, hb]).transpose(1, 2)                 # (n, m, Q, P)
    return Lm, M, u


def _intra_fwd(T, cumT, xb, dtb, ep, em, hb):
    """T (n, G, Q, Q) lower-triangular, cumT (n, H, Q), xb (n, Q, H, P), dtb (n, Q, H, 1),
    pivot factors ep, em (n, Q, H) and exact heads hb (``_pivot``) -> y (n, Q, H, P)."""
    G, H = T.shape[1], xb.shape[2]
    y = _tokens(T @ _grouped(xb * (dtb * em[..., None]), G), H).mul_(ep[..., None])
    if hb is not None:
        _, M, u = _exact_parts(T, cumT, xb, dtb, hb)
        y.index_add_(2, hb, (M @ u).transpose(1, 2))
    return y


def _intra_bwd(T, cumT, xb, dtb, ep, em, hb, gyb):
    """Gradients of ``_intra_fwd`` for T (lower triangle, (n, G, Q, Q)) and u = dt x
    (token-major (n, Q, H, P))."""
    G, H = T.shape[1], xb.shape[2]
    gz = _grouped(gyb * ep[..., None], G)                              # (n, G, Q, Hg P)
    gT = (gz @ _grouped(xb * (dtb * em[..., None]), G).mT).tril_()      # (n, G, Q, Q)
    gu = _tokens(T.mT @ gz, H).mul_(em[..., None])
    if hb is not None:
        Lm, M, u = _exact_parts(T, cumT, xb, dtb, hb)
        gyh = gyb[:, :, hb].transpose(1, 2)                            # (n, m, Q, P)
        gu.index_add_(2, hb, (M.mT @ gyh).transpose(1, 2))
        gT.index_add_(1, hb // (H // G), (gyh @ u.mT).mul_(Lm))
    return gT, gu


# -------------------------------------------------------------------------------------
# Layouts inside the chunked kernel (k = (batch, chunk) pair, K = b * L/Q of them; Q = position
# in the chunk; Hg = heads per group):
#   token-major  (K, Q, H, P)       x, u = dt x, outputs
#   states       (K, G, N, Hg*P)    "N-major", so C @ S and B^T @ u fold all heads of a
#                                   group into one matrix product per chunk; the loop over
#                                   chunks views them as (b, c, G, N, Hg, P)
# Everything but the loop over chunks is independent per chunk, and runs over blocks of
# chunks (``ops.blocks``) so that a block's intermediates stay in cache between the
# elementwise passes and the small matrix products (on CPU ~1.5x faster than whole-sequence
# passes, which are bound by memory bandwidth).
def _doc_masks(seq_idx: Tensor, Q: int, dtype):
    """seq_idx (b, L) (L a multiple of Q) -> per chunk k = (batch, chunk): Tm (K, 1, Q, Q)
    same-document pairs, m_in (K, Q, 1) tokens of the document the incoming state belongs
    to (the one before the chunk; 0 for the first chunk), m_end (K, Q, 1) tokens of the
    chunk's last document."""
    b, L = seq_idx.shape
    si = seq_idx.reshape(b * (L // Q), Q)
    prev = F.pad(seq_idx[:, Q - 1::Q][:, :-1], (1, 0)).reshape(-1, 1)  # doc before each chunk
    Tm = (si[:, :, None] == si[:, None, :]).to(dtype)[:, None]
    return Tm, (si == prev).to(dtype)[..., None], (si == si[:, -1:]).to(dtype)[..., None]


class _SSDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, D, Q: int, seq_idx=None):
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        nc, Hg = L // Q, H // G
        K = b * nc
        Tm = m_in = m_end = None
        if seq_idx is not None:
            Tm, m_in, m_end = _doc_masks(seq_idx, Q, x.dtype)
        cumT = (dt * A).view(K, Q, H).transpose(1, 2).contiguous().cumsum(-1)  # (K, H, Q)
        cum = cumT.transpose(1, 2)                                     # (K, Q, H) view
        Bc = B.view(K, Q, G, N).transpose(1, 2).contiguous()           # (K, G, Q, N)
        Cc = C.view(K, Q, G, N).transpose(1, 2).contiguous()
        T = (Cc @ Bc.mT).tril_()                                       # (K, G, Q, Q)
        # per-token decay factors, token-major and contiguous (exp of the transposed view
        # would keep its strides, and every broadcast multiply with them would be strided)
        w = (cum[:, -1:] - cum).exp_().contiguous()                    # (K, Q, H)
        ecum = cum.exp().contiguous()                                  # (K, Q, H)
        if Tm is not None:
            T.mul_(Tm)
            w.mul_(m_end)
            ecum.mul_(m_in)
        xk, dtk = x.view(K, Q, H, P), dt.view(K, Q, H, 1)
        blocks = ops.blocks(K, Q * H * max(P, Q))
        ep, em, exact = _pivot(cum, blocks)
        # (2) chunk-local final states: s = sum_j exp(cum_Q - cum_j) B_j^T u_j
        s = x.new_empty(K, G, N, Hg * P)
        for kb in blocks:
            torch.matmul(Bc[kb].mT, _grouped(xk[kb] * (dtk[kb] * w[kb, ..., None]), G), out=s[kb])
        # (3) pass states: S_in[c] = a_{c-1} S_in[c-1] + s[c-1], a linear loop over chunks
        a = cumT[..., -1].exp()                                        # chunk decays (K, H)
        if m_in is not None:  # a chunk ending in another document passes no state on
            a.mul_(m_in[:, -1])
        a = a.reshape(b, nc, G, 1, Hg, 1)
        S = torch.empty_like(s).view(b, nc, G, N, Hg, P)
        s6 = s.view(b, nc, G, N, Hg, P)
        S[:, 0] = h0.reshape(b, G, Hg, P, N).permute(0, 1, 4, 2, 3)
        for c in range(1, nc):
            torch.addcmul(s6[:, c - 1], S[:, c - 1], a[:, c - 1], out=S[:, c])
        h_last = torch.addcmul(s6[:, -1], S[:, -1], a[:, -1])          # (b, G, N, Hg, P)
        del s, s6
        # (4) the incoming state's contribution exp(cum_i) C_i . S_in, plus (1) the
        # intra-chunk part
        S4 = S.view(K, G, N, Hg * P)
        out = torch.empty_like(xk)
        for kb, hb in zip(blocks, exact):
            if G == 1:
                torch.matmul(Cc[kb], S4[kb], out=out[kb].view(-1, 1, Q, H * P))
            else:
                out[kb] = _tokens(Cc[kb] @ S4[kb], H)
            y_in = _intra_fwd(T[kb], cumT[kb], xk[kb], dtk[kb], ep[kb], em[kb], hb)
            out[kb].mul_(ecum[kb, ..., None]).add_(y_in)
            if D is not None:  # the D x skip, fused here while the block is in cache
                out[kb].addcmul_(xk[kb], D[:, None])
        out = out.view(b, L, H, P)
        ctx.save_for_backward(x, dt, A, Bc, Cc, cumT, T, w, a, S, h_last, out, D, ep, em, seq_idx)
        ctx.Q, ctx.exact = Q, exact
        # contiguous (b, H, P, N): decode steps then run on a dense state
        return out, h_last.permute(0, 1, 3, 4, 2).contiguous().view(b, H, P, N)

    @staticmethod
    def backward(ctx, gy, gh):
        x, dt, A, Bc, Cc, cumT, T, w, a, S, h_last, out, D, ep, em, seq_idx = ctx.saved_tensors
        Q = ctx.Q
        b, L, H, P = x.shape
        nc, G, N = L // Q, Bc.shape[1], Bc.shape[3]
        Hg, K = H // G, b * (L // Q)
        cum = cumT.transpose(1, 2)                                     # (K, Q, H) view
        xk, dtk = x.view(K, Q, H, P), dt.view(K, Q, H, 1)
        gy = gy.contiguous().view(K, Q, H, P) if gy is not None else x.new_zeros(K, Q, H, P)
        outk, S4 = out.view(K, Q, H, P), S.view(K, G, N, Hg * P)
        ecum = cum.exp().contiguous()
        Tm = None
        if seq_idx is not None:
            Tm, m_in, _ = _doc_masks(seq_idx, Q, x.dtype)
            ecum.mul_(m_in)
        blocks = ops.blocks(K, Q * H * max(P, Q))
        # Gradient of the log-decays: exp(cum_i) (rows of the decays, y_off) gives
        # <gy_i, out_i>; exp(-cum_j) (columns, w) gives -dt_j <gu_j, x_j>; exp(cum_last)
        # (w, a) gives <dL/dS_end, S_end> per chunk. No Q x Q pass is needed for it.
        gcum = x.new_empty(K, Q, H)
        gC = x.new_empty(K, G, Q, N)
        gS = torch.empty_like(S)                                       # (b, c, G, N, Hg, P)
        gS4 = gS.view(K, G, N, Hg * P)
        gD = None if D is None else torch.zeros_like(D)
        for kb in blocks:  # (4) y_off = exp(cum) * (C @ S_in)
            torch.linalg.vecdot(gy[kb], outk[kb], out=gcum[kb])
            if D is not None:  # <gy, out - D x> = <gy, out> - D <gy, x>, and dL/dD = sum <gy, x>
                gyx = torch.linalg.vecdot(gy[kb], xk[kb])
                gcum[kb].addcmul_(gyx, D, value=-1)
                gD += gyx.sum((0, 1))
            gZ = _grouped(gy[kb] * ecum[kb, ..., None], G)
            torch.matmul(gZ, S4[kb].mT, out=gC[kb])                    # (n, G, Q, N)
            torch.matmul(Cc[kb].mT, gZ, out=gS4[kb])
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
        del gS, gS4
        gcum4 = gcum.view(b, nc, Q, H)
        gcum4[:, :-1, -1] += torch.linalg.vecdot(gs[:, :-1], S[:, 1:], dim=5).sum(3).view(b, nc - 1, H)
        gcum4[:, -1, -1] += (gs[:, -1] * h_last).sum((2, 4)).view(b, H)
        gs4 = gs.view(K, G, N, Hg * P)
        gB = x.new_empty(K, G, Q, N)
        gx, gux = torch.empty_like(xk), x.new_empty(K, Q, H)
        for kb, hb in zip(blocks, ctx.exact):
            xb, dtb, wb = xk[kb], dtk[kb], w[kb, ..., None]
            # (2) s = B^T v, v = w dt x
            torch.matmul(_grouped(xb * (dtb * wb), G), gs4[kb].mT, out=gB[kb])  # (n, G, Q, N)
            # (1) the intra-chunk product; gu = dL/du
            gT, gu = _intra_bwd(T[kb], cumT[kb], xb, dtb, ep[kb], em[kb], hb, gy[kb])
            if Tm is not None:
                gT.mul_(Tm[kb])
            gu.addcmul_(_tokens(Bc[kb] @ gs4[kb], H), wb)
            gC[kb] += gT @ Bc[kb]
            gB[kb] += gT.mT @ Cc[kb]
            torch.linalg.vecdot(gu, xb, out=gux[kb])                   # (n, Q, H)
            torch.mul(gu, dtb, out=gx[kb])
            if D is not None:
                gx[kb].addcmul_(gy[kb], D[:, None])
        gcum -= gux * dtk[..., 0]
        # cum = cumsum(dt A) within the chunk -> reverse cumsum
        gdA = (gcum - gcum.cumsum(1) + gcum.sum(1, keepdim=True)).reshape(b, L, H)
        gdt = gdA * A + gux.reshape(b, L, H)
        gA = (gdA * dt).sum((0, 1))
        gB = gB.transpose(1, 2).reshape(b, L, G, N)
        gC = gC.transpose(1, 2).reshape(b, L, G, N)
        return gx.view(b, L, H, P), gdt, gA, gB, gC, gh0, gD, None, None


class _SSDIntra(torch.autograd.Function):
    """One chunk, zero initial state, final state not wanted (training on windows no longer
    than the chunk): only the intra-chunk product is needed, which skips the state terms
    (about half the work at short training windows)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, seq_idx=None):
        cumT = (dt * A).transpose(1, 2).contiguous().cumsum(-1)                  # (b, H, L)
        Bh, Ch = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, G, L, N)
        T = (Ch @ Bh.mT).tril_()                                                  # (b, G, L, L)
        Tm = None
        if seq_idx is not None:  # same-document pairs only
            Tm = (seq_idx[:, :, None] == seq_idx[:, None, :]).to(x.dtype)[:, None]
            T.mul_(Tm)
        ep, em, (hb,) = _pivot(cumT.transpose(1, 2), [slice(0, x.shape[0])])
        out = _intra_fwd(T, cumT, x, dt[..., None], ep, em, hb)                   # (b, L, H, P)
        ctx.save_for_backward(x, dt, A, Bh, Ch, cumT, T, out, ep, em, Tm)
        ctx.hb = hb
        return out

    @staticmethod
    def backward(ctx, gy):
        x, dt, A, Bh, Ch, cumT, T, out, ep, em, Tm = ctx.saved_tensors
        gT, gu = _intra_bwd(T, cumT, x, dt[..., None], ep, em, ctx.hb, gy.contiguous())
        if Tm is not None:
            gT.mul_(Tm)
        # d/dcum: rows exp(cum_i) give <gy_i, out_i>, columns exp(-cum_j) give -dt_j <gu_j, x_j>
        gux = torch.linalg.vecdot(gu, x)                                          # (b, L, H)
        gcum = torch.linalg.vecdot(gy, out) - gux * dt
        gC = (gT @ Bh).transpose(1, 2)
        gB = (gT.mT @ Ch).transpose(1, 2)
        gdA = gcum - gcum.cumsum(1) + gcum.sum(1, keepdim=True)                    # reverse cumsum
        gx = gu * dt[..., None]
        gdt = gdA * A + gux
        gA = (gdA * dt).sum((0, 1))
        return gx, gdt, gA, gB, gC, None


@ops.no_autocast
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
             D: Optional[Tensor] = None, h0: Optional[Tensor] = None,
             return_state: bool = True, seq_idx: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Chunked SSD. Returns y (b, L, H, P) and the final state h_last (b, H, P, N)
    (None with ``return_state=False``, which lets a zero-state window of at most one chunk
    skip the state terms). ``seq_idx`` (b, L): the state restarts at each document (h0 feeds
    document 0; h_last is the last document's state)."""
    b, L, H, P = x.shape
    G = B.shape[2]
    if H % G:
        raise ValueError(f"ssd_scan: groups G={G} must divide heads H={H}")
    if chunk_size <= 0:
        raise ValueError(f"ssd_scan: chunk_size must be > 0, got {chunk_size}")
    if B.shape != C.shape or B.shape[:2] != x.shape[:2] or dt.shape != x.shape[:3] or A.shape != (H,):
        raise ValueError(f"ssd_scan: shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)} do not agree")
    if L == 0:  # nothing to scan: empty output, the state passes through
        h = h0 if h0 is not None else x.new_zeros(b, H, P, B.shape[3])
        return x * 0, (h if return_state else None)
    if use_triton_ssd(x, dt, B, C):
        # mamba_chunk_scan_combined's contract (ssd_combined.py): x (b, L, H, P), dt (b, L, H),
        # A (H,), B/C (b, L, G, N), D (H,) or (H, P), initial_states (b, H, P, N)
        y, h_last = _mcsc(x, dt, A.float(), B, C, chunk_size, D=D, initial_states=h0, return_final_states=True,
                          **({} if seq_idx is None else {"seq_idx": seq_idx.to(torch.int32)}))
        return y, h_last
    Q = min(chunk_size, L)
    if h0 is None and not return_state and L <= chunk_size:
        y = _SSDIntra.apply(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), seq_idx)
        return (y + x * D[:, None] if D is not None else y), None
    pad = (-L) % Q
    xs, dts, Bs, Cs = x, dt, B, C
    if pad:  # padded steps have dt = 0: no input and decay 1, so h_last is unchanged
        xs, Bs, Cs = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dts = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:  # padded steps join the last document
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], 1)
    if h0 is None:
        h0 = x.new_zeros(b, H, P, B.shape[3])
    xs, dts, Bs, Cs = (t.contiguous() for t in (xs, dts, Bs, Cs))
    if seq_idx is not None:
        seq_idx = seq_idx.contiguous()
    y, h_last = _SSDChunked.apply(xs, dts, A, Bs, Cs, h0, D, Q, seq_idx)
    if pad:
        y = y[:, :L]
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


def ssd_ref(x, dt, A, B, C, D=None, h0=None, seq_idx=None):
    """Obvious sequential recurrence, one token at a time (tests only); with ``seq_idx`` the
    state is zeroed before each document's first token."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    h = x.new_zeros(b, H, P, N) if h0 is None else h0
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            h = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None, None], torch.zeros_like(h), h)
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
