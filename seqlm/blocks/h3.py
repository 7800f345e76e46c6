"""H3 — Hungry Hungry Hippos (Dao, Fu et al., 2023). Pattern char ``H``.

q, k, v = projections of x (H heads of width P = head_dim). k passes a *shift* SSM (a learned
causal convolution of ``shift_size`` taps, d_state by default as in the reference's
``SSKernel(mode="shift", N=d_state)``; its current-token tap is the reference's skip ``D_k``),
then kv = shift(k) v^T per head (P x P channels; elementwise when P = 1) passes a *diagonal*
SSM with complex modes (S4D-Lin), one per head shared by the head's P x P channels as in the
reference: x_t = a x_{t-1} + b u_t, s_t = 2 Re(c x_t) + D u_t, and y[j] = sum_i q[i] s[i, j]
-> out_proj. Discretisation: bilinear (the reference kernel's default) or ZOH.
Training / prefill: the SSM kernel K[l] = 2 Re(c b a^l) is materialised and applied by FFT,
O(L log L). Generation: the recurrence, O(1) per token. A carried state adds c a^{t+1} x_0 to
the outputs and is advanced by a weighted sum of the chunk's inputs.

Deviations from HazyResearch/H3 (``src/models/ssm/h3.py``), all function-class preserving
except the first: (1) no biases in the projections by default (``bias``); (2) the diagonal
SSM's B is fixed to 1 (the reference trains B and C, whose product is what the kernel uses);
(3) the shift SSM's B is fixed to e_1 (the reference trains it; the kernel is C * B); (4) the
shift kernel's last tap and the skip D_k are one weight. SSM parameters (log_dt, A's real
and imaginary parts) and D are exempt from weight decay (``no_weight_decay``), as the
reference registers them with weight decay 0.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from seqlm.blocks.base import Block, BlockConfig
from seqlm.blocks.plan import Part, Split
from seqlm.ops.conv import causal_conv1d_step, causal_conv1d_tokens
from seqlm.ops.fftconv import diag_ssm_kernel, fft_conv, fft_conv_docs
from seqlm.registry import register


class H3Config(BlockConfig):
    type: Literal["h3"] = "h3"
    d_state: int = Field(64, gt=0, description="Real state size of the diagonal SSM (d_state/2 complex modes; even).")
    head_dim: int = Field(1, gt=0, description="Head width P; kv is a P x P outer product per head (1 = elementwise, H3's default).")
    shift_size: Optional[int] = Field(None, ge=2, description="Taps of the shift SSM (learned causal convolution over k); null = d_state, the reference's length.")
    discretization: Literal["bilinear", "zoh"] = Field("bilinear", description="Discretisation of the diagonal SSM: bilinear (the H3 reference kernel's default) or zero-order hold.")
    dt_min: float = Field(1e-3, gt=0, description="Smallest initial step size of the diagonal SSM.")
    dt_max: float = Field(1e-1, gt=0, description="Largest initial step size of the diagonal SSM.")
    bias: bool = Field(False, description="Bias in the projections.")

    def check(self, d_model: int) -> list[tuple[str, str]]:
        out = []
        if self.d_state % 2:
            out.append(("d_state", f"must be even (complex modes come in pairs), got {self.d_state}"))
        if d_model % self.head_dim:
            out.append(("head_dim", f"must divide d_model={d_model}"))
        if self.dt_min > self.dt_max:
            out.append(("dt_min", f"must be <= dt_max={self.dt_max}"))
        return out

    def tp_check(self, d_model: int, tp: int) -> list[tuple[str, str]]:
        if (d_model // self.head_dim) % tp:
            return [("head_dim", f"{d_model // self.head_dim} heads do not split over tp_size={tp}")]
        return []


@register("h3", char="H")
class H3(Block):
    Config = H3Config

    #: SSM parameters trained without weight decay (the reference's weight decay 0)
    no_weight_decay = ("log_dt", "A_log_re", "A_im", "D")

    def __init__(self, cfg: H3Config, d_model: int):
        super().__init__(cfg, d_model)
        self.P = cfg.head_dim
        self.H = d_model // cfg.head_dim
        self.N = cfg.d_state // 2
        self.S = cfg.shift_size or cfg.d_state
        H = self.H  # SSM parameters per head, shared by its P x P kv channels
        self.q_proj = nn.Linear(d_model, d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=cfg.bias)
        self.shift_weight = nn.Parameter(torch.empty(d_model, self.S))  # (D, S); [:, -1] = current token
        self.log_dt = nn.Parameter(torch.empty(H))
        self.A_log_re = nn.Parameter(torch.empty(H, self.N))
        self.A_im = nn.Parameter(torch.empty(H, self.N))
        self.C_ri = nn.Parameter(torch.empty(H, 2 * self.N))  # [re | im]
        self.D = nn.Parameter(torch.empty(H))
        self.init_weights()

    def init_weights(self, n_layers: int = 1, std: float = 0.02) -> None:
        super().init_weights(n_layers, std)
        c = self.cfg
        with torch.no_grad():
            # the reference: shift kernel ~ U(+-1/sqrt(S)) (Conv1d's init), skip D_k ~ N(0, 1)
            nn.init.uniform_(self.shift_weight, -1.0 / math.sqrt(self.S), 1.0 / math.sqrt(self.S))
            self.shift_weight[:, -1] += torch.randn_like(self.shift_weight[:, -1])
            u = torch.rand_like(self.log_dt)
            self.log_dt.copy_(math.log(c.dt_min) + u * (math.log(c.dt_max) - math.log(c.dt_min)))
            self.A_log_re.fill_(math.log(0.5))  # S4D-Lin: A = -1/2 + i pi n
            self.A_im.copy_(math.pi * torch.arange(self.N, dtype=self.A_im.dtype).expand_as(self.A_im))
            nn.init.normal_(self.C_ri, 0.0, math.sqrt(0.5))  # complex standard normal
            nn.init.normal_(self.D, 0.0, 1.0)

    # -- SSM parameters -------------------------------------------------------------
    def _ssm(self, dtype):
        """-> log_a = log a_bar, a_bar, b_bar (B = 1), c; all (H, N) complex."""
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        A = torch.complex(-torch.exp(self.A_log_re), self.A_im).to(cdt)
        dt = torch.exp(self.log_dt).to(cdt)[:, None]
        dtA = dt * A
        if self.cfg.discretization == "zoh":
            log_a, a_bar = dtA, torch.exp(dtA)
            b_bar = (a_bar - 1) / A
        else:  # bilinear: a = (1 + dtA/2) / (1 - dtA/2), b = dt / (1 - dtA/2)
            den = 1 - dtA / 2
            a_bar = (1 + dtA / 2) / den
            log_a, b_bar = torch.log(a_bar), dt / den
        c = torch.complex(self.C_ri[:, : self.N], self.C_ri[:, self.N:]).to(cdt)
        return log_a, a_bar, b_bar, c

    def _kv(self, k, v):
        # k, v (B, L, D) -> kv (B, H, P*P, L): kv[b, h, (i,j), t] = k[b,t,h,i] v[b,t,h,j]
        B, L, _ = k.shape
        kh = k.view(B, L, self.H, self.P, 1)
        vh = v.view(B, L, self.H, 1, self.P)
        return (kh * vh).permute(0, 2, 3, 4, 1).reshape(B, self.H, self.P * self.P, L)

    def _readout(self, q, s):
        # q (B, L, D), s (B, H, P*P, L) -> (B, L, D): y[b,t,h,j] = sum_i q[b,t,h,i] s[b,h,(i,j),t]
        B, L, _ = q.shape
        if self.P == 1:
            return q * s[:, :, 0].transpose(1, 2)
        s = s.view(B, self.H, self.P, self.P, L)
        y = torch.einsum("blhi,bhijl->blhj", q.view(B, L, self.H, self.P), s)
        return y.reshape(B, L, self.d_model)

    def forward(self, x, state=None, seq_idx=None):
        B, L, _ = x.shape
        if L == 0:  # empty input: empty output, the state passes through
            return self.out_proj(x), (None if state is None else dict(state))
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        ks, shift = causal_conv1d_tokens(k, self.shift_weight, None, None if state is None else state["shift"],
                                         None, seq_idx)
        kv = self._kv(ks, v)  # (B, H, M, L), M = P*P
        log_a, a_bar, b_bar, c = self._ssm(x.dtype)
        K = diag_ssm_kernel(log_a, c * b_bar, L)  # (H, L)
        H, M = self.H, self.P * self.P
        Kc, Dc = (K, self.D) if M == 1 else (K.repeat_interleave(M, 0), self.D.repeat_interleave(M))
        conv = fft_conv if seq_idx is None else (lambda *a: fft_conv_docs(*a, seq_idx))  # noqa: E731
        s = conv(kv.reshape(B, H * M, L), Kc, Dc).view(B, H, M, L)
        new_state = None
        if state is not None:
            x0 = state["ssm"]  # (B, H, M, N) complex: the state before this chunk
            pos = torch.arange(1, L + 1, device=x.device, dtype=log_a.real.dtype)
            pw = torch.exp(log_a[..., None] * pos)  # (H, N, L): a^{t+1}
            carry = 2 * torch.einsum("bhmn,hn,hnl->bhml", x0, c, pw).real.to(s.dtype)
            kvl, x0l = kv, x0
            if seq_idx is not None:  # x0 reaches document 0 only; the new state is the last document's
                carry = carry * (seq_idx == 0).to(s.dtype)[:, None, None, :]
                kvl = kv * (seq_idx == seq_idx[:, -1:]).to(kv.dtype)[:, None, None, :]
                x0l = x0 * (seq_idx[:, -1] == 0).to(x0.dtype)[:, None, None, None]
            s = s + carry
            # x_{L-1} = a^L x0 + sum_t a^{L-1-t} b u_t
            rev = torch.flip(pw, dims=[-1]) / a_bar[..., None]  # a^{L-1-t}
            xT = pw[..., -1][None, :, None, :] * x0l + torch.einsum(
                "bhml,hnl->bhmn", kvl.to(rev.dtype), b_bar[..., None] * rev)
            new_state = {"shift": shift, "ssm": xT}
        return self.out_proj(self._readout(q, s)), new_state

    def init_state(self, batch, max_len, device=None, dtype=None):
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        return {"shift": torch.zeros(batch, self.d_model, self.S - 1, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, self.H, self.P * self.P, self.N, device=device, dtype=cdt)}

    def step(self, x_t, state):
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)  # (B, 1, D)
        ks, shift = causal_conv1d_step(k[:, 0], self.shift_weight, None, state["shift"])
        kv = self._kv(ks[:, None], v)[..., 0]  # (B, H, M)
        _, a_bar, b_bar, c = self._ssm(x_t.dtype)
        xs = a_bar[None, :, None, :] * state["ssm"] + b_bar[None, :, None, :] * kv[..., None].to(a_bar.dtype)
        s = 2 * (c[None, :, None, :] * xs).sum(-1).real.to(kv.dtype) + self.D[None, :, None] * kv
        y = self._readout(q, s[..., None])
        return self.out_proj(y), {"shift": shift, "ssm": xs}

    # -- tensor parallelism (seqlm/parallel): heads split; SSM channels follow their heads --
    def tp_plan(self, tp: int = 1):
        heads = Split(0, (Part(self.d_model, self.P),))  # channels, cut by whole heads
        return {r"(q|k|v)_proj\.(weight|bias)": heads, r"out_proj\.weight": Split(1, heads.parts),
                r"out_proj\.bias": "replicate", r"shift_weight": heads,
                r"(log_dt|A_log_re|A_im|C_ri|D)": "column"}  # one row per head

    def tp_local(self, tp: int):
        # d_model here is the block's channel count (q/k/v width); the input stays full width
        return {"H": self.H // tp, "d_model": self.d_model // tp}
