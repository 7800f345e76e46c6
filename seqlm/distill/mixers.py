"""Model hooks for distillation, from outside the model code.

- :class:`LayerTrace`: forward hooks on a model's stack that record, per layer, the residual
  stream entering it, the (normed) block input and the block output, and optionally each
  attention layer's probabilities per head.
- :func:`mixing_matrix`: a sequence mixer's materialised (b, heads, L, L) matrix on an input,
  so that the mixer's core output is ``M @ values`` per head:
    attention  softmax(q k^T / sqrt(hd)) (causal, window)      values v
    mamba2     M[l,s] = (C_l . B_s) dt_s exp(sum_{k=s+1..l} dt_k A) + D on the diagonal
               (seqlm.ops.ssd_matrix)                           values x (after conv + SiLU)
    mamba      one matrix per channel d (heads = d_inner):
               M_d[l,s] = sum_n C_l[n] B_s[n] delta_s[d] exp(A[d,n] sum_{k=s+1..l} delta_k[d]) + D_d
                                                                values x (after conv + SiLU)
    h3         M_h[t,u] = (K_h[t-u] + D_h [t=u]) sum_i q_t[h,i] shift(k)_u[h,i]
                                                                values v
  The gate (Mamba's z, Mamba-2's gated norm) and out_proj act after the mixing, as in the
  blocks; tests/test_distill.py checks each matrix against the block's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from seqlm.ops.attention import attention_probs
from seqlm.ops.conv import causal_conv1d_tokens
from seqlm.ops.fftconv import diag_ssm_kernel
from seqlm.ops.ssd import ssd_matrix


class LayerTrace:
    """``with LayerTrace(model, probs=True) as tr: model(x)`` then ``tr.residual[i]``,
    ``tr.block_in[i]``, ``tr.block_out[i]`` (B, L, D) and ``tr.probs[i]`` (B, H, L, L) for
    attention layers. Layers are recorded in call order (one forward = one entry per layer)."""

    def __init__(self, model, probs: bool = False):
        self.stack = model.stack
        self.want_probs = probs
        self.residual: list[Tensor] = []
        self.block_in: list[Tensor] = []
        self.block_out: list[Tensor] = []
        self.probs: dict[int, Tensor] = {}
        self._handles = []

    def __enter__(self) -> "LayerTrace":
        for norm in self.stack.norms:
            self._handles.append(norm.register_forward_pre_hook(self._on_norm))
        for blk in dict.fromkeys(self.stack.blocks):  # shared blocks (recursive) hooked once
            self._handles.append(blk.register_forward_hook(self._on_block))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_norm(self, mod, args):
        self.residual.append(args[0])

    def _on_block(self, blk, args, out):
        i = len(self.block_in)
        self.block_in.append(args[0])
        self.block_out.append(out[0])
        if self.want_probs and blk.name == "attention":
            self.probs[i] = mixing_matrix(blk, args[0])


# -------------------------------------------------------------------------------------------
# materialised mixing matrices

def attention_matrix(blk, u: Tensor) -> Tensor:
    q, k, _ = blk._qkv(u, 0)                                             # (B, H*, L, hd)
    return attention_probs(q, k, 0, blk.window)                          # (B, H, L, L)


def mamba2_parts(blk, u: Tensor):
    """The Mamba-2 block's pieces on input u (B, L, D): z (B, L, d_inner), x (B, L, H, P),
    B, C (B, L, G, N), dt (B, L, H) (softplus'ed), A (H,)."""
    Bsz, L, _ = u.shape
    z, xBC, dt = blk._split(blk.in_proj(u))
    xBC, _ = causal_conv1d_tokens(xBC, blk.conv_weight, blk.conv_bias, None, "silu")
    xs, B, C, dt, A = blk._ssm_inputs(xBC, dt)
    return (z, xs.reshape(Bsz, L, blk.H, blk.P), B.reshape(Bsz, L, blk.G, blk.N),
            C.reshape(Bsz, L, blk.G, blk.N), dt, A)


def mamba2_matrix(blk, u: Tensor) -> Tensor:
    _, _, B, C, dt, A = mamba2_parts(blk, u)
    return ssd_matrix(dt, A, B, C, blk.D)                                # (B, H, L, L)


def mamba_parts(blk, u: Tensor):
    """The Mamba-1 block's pieces: x (B, L, d_inner) after conv + SiLU, z, delta (softplus'ed,
    with bias), B, C (B, L, N), A (d_inner, N)."""
    xs, z = blk._in_proj(u)
    xc, _ = causal_conv1d_tokens(xs, blk.conv_weight, blk.conv_bias, None, "silu")
    raw, B, C = blk._ssm_inputs(xc)
    delta = F.softplus(raw + blk.dt_proj.bias)
    return xc, z, delta, B, C, -torch.exp(blk.A_log)


def _mamba_channels(delta, B, C, A, D):
    # delta (b, L, c), B/C (b, L, N), A (c, N), D (c,) -> (b, c, L, L); fp32 or wider
    ct = torch.promote_types(delta.dtype, torch.float32)
    delta, B, C, A, D = (t.to(ct) for t in (delta, B, C, A, D))
    L = delta.shape[1]
    cum = delta.cumsum(1).transpose(1, 2)                                # (b, c, L)
    seg = cum[..., :, None] - cum[..., None, :]                          # (b, c, L, L): sum_{s<k<=l}
    upper = torch.ones(L, L, dtype=torch.bool, device=delta.device).triu(1)
    seg = seg.masked_fill(upper, 0.0)
    decay = torch.exp(seg[..., None] * A[None, :, None, None, :])         # (b, c, L, L, N)
    M = torch.einsum("bclsn,bln,bsn->bcls", decay, C, B)
    M = M.masked_fill(upper, 0.0) * delta.transpose(1, 2)[:, :, None, :]
    return M + torch.diag_embed(D[:, None].expand(M.shape[0], -1, L))


def mamba_matrix(blk, u: Tensor, chunk: int = 16) -> Tensor:
    """(B, d_inner, L, L): one matrix per channel. Memory O(b * chunk * L^2 * N) per chunk of
    channels (each chunk is recomputed in the backward), so meant for distillation windows."""
    _, _, delta, B, C, A = mamba_parts(blk, u)
    out = []
    for c0 in range(0, delta.shape[-1], chunk):
        sl = slice(c0, c0 + chunk)
        args = (delta[..., sl], B, C, A[sl], blk.D[sl])
        out.append(checkpoint(_mamba_channels, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else _mamba_channels(*args))
    return torch.cat(out, 1)


def h3_matrix(blk, u: Tensor) -> Tensor:
    """(B, H, L, L) with H = d_model / head_dim heads, acting on v per head; the diagonal SSM
    (kernel K_h and skip D_h) is shared by a head's channels."""
    Bsz, L, _ = u.shape
    q, k = blk.q_proj(u), blk.k_proj(u)
    ks, _ = causal_conv1d_tokens(k, blk.shift_weight, None, None)
    log_a, _, b_bar, c = blk._ssm(u.dtype)
    ct = torch.promote_types(u.dtype, torch.float32)
    K = diag_ssm_kernel(log_a, c * b_bar, L).to(ct)                      # (H, L)
    idx = torch.arange(L, device=u.device)
    lag = idx[:, None] - idx[None, :]                                    # (L, L): t - u
    T = K[:, lag.clamp(min=0)].masked_fill(lag < 0, 0.0)                 # (H, L, L) Toeplitz
    T = T + torch.diag_embed(blk.D.to(ct)[:, None].expand(-1, L))
    H, P = blk.H, blk.P
    qh, kh = q.to(ct).view(Bsz, L, H, P), ks.to(ct).view(Bsz, L, H, P)
    return torch.einsum("bthi,htu,buhi->bhtu", qh, T, kh)


_MATRIX = {"attention": attention_matrix, "mamba2": mamba2_matrix, "mamba": mamba_matrix, "h3": h3_matrix}


def has_matrix(blk) -> bool:
    return getattr(blk, "name", None) in _MATRIX


def mixing_matrix(blk, u: Tensor) -> Tensor:
    """The block's (B, heads, L, L) mixing matrix on its input u (B, L, D)."""
    fn = _MATRIX.get(getattr(blk, "name", None))
    if fn is None:
        raise ValueError(f"no materialised mixing matrix for block type {getattr(blk, 'name', blk)!r} "
                         f"(have: {sorted(_MATRIX)})")
    return fn(blk, u)


def match_heads(M: Tensor, target: Tensor) -> Tensor:
    """``target`` (b, T, L, L) brought to M's head count S (b, S, L, L): repeated when S is a
    multiple of T (S heads / channels grouped by target head), averaged in groups when T is a
    multiple of S."""
    S, T = M.shape[1], target.shape[1]
    if S == T:
        return target
    if S % T == 0:
        return target.repeat_interleave(S // T, dim=1)
    if T % S == 0:
        return target.unflatten(1, (S, T // S)).mean(2)
    raise ValueError(f"mixing matrices: {S} student heads and {T} teacher heads; one must divide the other")


def orientation_loss(M: Tensor, A: Tensor) -> Tensor:
    """Frobenius distance ||M - A||_F per (batch, head), averaged (MOHAWK stage 1)."""
    A = match_heads(M, A).to(M.dtype)
    return torch.linalg.matrix_norm(M.float() - A.float()).mean()
