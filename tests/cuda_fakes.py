"""Fakes of the CUDA kernels seqlm dispatches to (causal-conv1d, mamba-ssm's selective scan
and SSD, flash-attn). Each enforces the real kernel's documented preconditions, read from
the packages' sources (causal-conv1d 1.7 ``causal_conv1d_interface.py`` +
``csrc/causal_conv1d.cpp``; mamba-ssm 2.3 ``selective_scan_interface.py`` +
``csrc/selective_scan/selective_scan.cpp`` and ``ops/triton/ssd_combined.py``; flash-attn 2.8
``flash_attn_interface.py`` + ``csrc/flash_attn/flash_api.cpp``): first the Python wrapper's
own fix-ups (the copies it makes), then every check of the C++/Triton entry point, raising
:class:`KernelContractError` where the real kernel would fail. Only then is the result
computed, by seqlm's obvious references in fp32 and returned in the dtype the kernel returns.
"""
from __future__ import annotations

import contextlib

import torch

from seqlm.ops.attention import attention_ref
from seqlm.ops.conv import causal_conv1d_ref
from seqlm.ops.selective_scan import selective_scan_ref
from seqlm.ops.ssd import ssd_ref

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32,) + HALF


class KernelContractError(RuntimeError):
    """What the real kernel raises (TORCH_CHECK / assert) for the same call."""


def check(cond, msg):
    if not cond:
        raise KernelContractError(msg)


class Fake:
    def __init__(self):
        self.calls = []


class FakeCausalConv1d(Fake):
    """causal_conv1d_fn(x (B, C, L), weight (C, W), bias, ..., activation)."""

    def __call__(self, x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                 final_states_out=None, activation=None):
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError("activation must be None, silu, or swish")
        if x.stride(2) != 1 and x.stride(1) != 1:  # the wrapper's copy
            x = x.contiguous()
        check(x.dtype in FLOATS, f"causal_conv1d: input dtype {x.dtype}")
        check(weight.dtype in FLOATS, f"causal_conv1d: weight dtype {weight.dtype}")
        check(x.dim() == 3, "x must be (batch, dim, seqlen)")
        Bsz, C, L = x.shape
        W = weight.shape[-1]
        check(tuple(weight.shape) == (C, W), f"weight must have shape ({C}, {W}), got {tuple(weight.shape)}")
        check(x.stride(2) == 1 or x.stride(1) == 1, "x: one of dim/seqlen must be contiguous")
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        if channel_last:
            check(C % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
            check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
                  f"causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) "
                  f"to be multiples of 8, got {x.stride()}")
        check(2 <= W <= 4, f"causal_conv1d only supports width between 2 and 4, got {W}")
        if bias is not None:
            check(bias.dtype == weight.dtype, "bias dtype must equal weight dtype")
            check(tuple(bias.shape) == (C,), "bias must have shape (dim,)")
        if seq_idx is not None or initial_states is not None or return_final_states:
            check(channel_last, "seq_idx / initial_states / final_states need the channel last layout")
        self.calls.append({"shape": tuple(x.shape), "stride": x.stride(), "width": W, "dtype": x.dtype,
                           "channel_last": channel_last, "activation": activation})
        y = causal_conv1d_ref(x.float(), weight.float(), None if bias is None else bias.float(),
                              "silu" if activation else None)
        return y.to(x.dtype)


class FakeSelectiveScan(Fake):
    """selective_scan_fn(u, delta (b, D, L), A (D, N), B, C (b, N, L), D, z, delta_bias, ...)."""

    def __call__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
        # the wrapper's copies
        u = u if u.stride(-1) == 1 else u.contiguous()
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        D = None if D is None else D.contiguous()
        B = B if B.stride(-1) == 1 else B.contiguous()
        C = C if C.stride(-1) == 1 else C.contiguous()
        z = z if z is None or z.stride(-1) == 1 else z.contiguous()
        if B.dim() == 3:
            B = B[:, None]
        if C.dim() == 3:
            C = C[:, None]
        it, wt = u.dtype, A.dtype
        check(it in FLOATS, f"selective_scan: input dtype {it}")
        check(wt in (torch.float32, torch.complex64), f"selective_scan: weight (A) dtype {wt} (fp32 or complex64)")
        check(delta.dtype == it, f"delta dtype {delta.dtype} != input dtype {it}")
        check(B.dtype == it and C.dtype == it, f"B/C dtype {B.dtype}/{C.dtype} != input dtype {it}")
        Bsz, Dm, L = u.shape
        N = A.shape[1]
        check(N <= 256, "selective_scan only supports state dimension <= 256")
        check(tuple(delta.shape) == (Bsz, Dm, L) and tuple(A.shape) == (Dm, N), "u/delta/A shapes")
        check(tuple(B.shape) == (Bsz, B.shape[1], N, L) and B.shape == C.shape, "B/C must be (b, groups, N, L)")
        for name, t in (("D", D), ("delta_bias", delta_bias)):
            if t is not None:
                check(t.dtype == torch.float32, f"{name} must be fp32, got {t.dtype}")
                check(tuple(t.shape) == (Dm,), f"{name} must have shape (dim,)")
        if z is not None:
            check(z.dtype == it and tuple(z.shape) == (Bsz, Dm, L), "z dtype/shape")
        self.calls.append({"dtype": it, "N": N})
        f = lambda t: None if t is None else t.float().transpose(1, 2)  # noqa: E731
        y, h = selective_scan_ref(f(u), f(delta), A.float(), B[:, 0].float().transpose(1, 2),
                                  C[:, 0].float().transpose(1, 2), D, f(z), delta_bias, delta_softplus)
        y = y.transpose(1, 2).to(it)
        return (y, h) if return_last_state else y  # last state in the weight type (fp32)


class FakeSSD(Fake):
    """mamba_chunk_scan_combined(x (b, L, H, P), dt (b, L, H), A (H,), B, C (b, L, G, N), chunk_size, ...)."""

    def __call__(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                 seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                 return_final_states=False, return_varlen_states=False):
        Bsz, L, H, P = x.shape
        _, _, G, N = B.shape
        check(H % G == 0, "nheads % ngroups == 0")
        check(tuple(B.shape) == (Bsz, L, G, N), "B.shape == (batch, seqlen, ngroups, dstate)")
        check(tuple(dt.shape) == (Bsz, L, H), "dt.shape == (batch, seqlen, nheads)")
        check(tuple(A.shape) == (H,), "A.shape == (nheads,)")
        check(C.shape == B.shape, "C.shape == B.shape")
        if D is not None:
            check(tuple(D.shape) in ((H, P), (H,)), "D.shape == (nheads, headdim) or (nheads,)")
        if initial_states is not None:
            check(tuple(initial_states.shape) == (Bsz, H, P, N),
                  "initial_states.shape == (batch, nheads, headdim, dstate)")
        for name, t in (("x", x), ("dt", dt), ("B", B), ("C", C)):
            check(t.dtype in FLOATS, f"{name}: Triton's tl.dot takes fp32/fp16/bf16, got {t.dtype}")
        check(chunk_size > 0, "chunk_size")
        self.calls.append({"dtype": x.dtype, "chunk": chunk_size, "state": initial_states is not None})
        dtf = dt.float()
        if dt_bias is not None:
            dtf = dtf + dt_bias.float()
        if dt_softplus:
            dtf = torch.nn.functional.softplus(dtf)
        y, h = ssd_ref(x.float(), dtf, A.float(), B.float(), C.float(), None if D is None else D.float(),
                       None if initial_states is None else initial_states.float())
        y = y.to(x.dtype)
        return (y, h) if return_final_states else y


class FakeFlashAttn(Fake):
    """flash_attn_func(q (B, Tq, H, d), k, v (B, Tk, Hkv, d), causal, window_size)."""

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        check(q.dtype in HALF, f"FlashAttention only support fp16 and bf16 data type, got {q.dtype}")
        check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype")
        Bsz, Tq, H, d = q.shape
        _, Tk, Hkv, _ = k.shape
        check(d <= 256, "FlashAttention forward only supports head dimension at most 256")
        check(tuple(k.shape) == (Bsz, Tk, Hkv, d) and v.shape == k.shape, "k/v shapes")
        check(H % Hkv == 0, "Number of heads in key/value must divide number of heads in query")
        self.calls.append({"dtype": q.dtype, "Tq": Tq, "Tk": Tk, "window": window_size})
        # causal: aligned to the bottom-right corner (query i sits at Tk - Tq + i)
        win = None if window_size[0] < 0 else window_size[0] + 1
        o = attention_ref(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
                          q_offset=Tk - Tq if causal else 0, window=win)
        return o.transpose(1, 2).to(q.dtype)


class FakeFlashVarlen(Fake):
    """flash_attn_varlen_func(q (total_q, H, d), k, v (total_k, Hkv, d), cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size): mha_varlen_fwd's checks."""

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                 softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the wrapper's fix-up
        check(q.dtype in HALF, f"FlashAttention only support fp16 and bf16 data type, got {q.dtype}")
        check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check(cu.dtype == torch.int32, f"{name} must have dtype int32")
            check(cu.dim() == 1 and cu.is_contiguous(), f"{name} must be a contiguous 1-D tensor")
            check(cu.device == q.device, f"{name} must be on the device of q")
        check(q.dim() == 3 and k.dim() == 3 and v.shape == k.shape, "q/k/v must be (total, heads, head_dim)")
        total_q, H, d = q.shape
        total_k, Hkv, _ = k.shape
        check(d <= 256, "FlashAttention forward only supports head dimension at most 256")
        check(k.shape[-1] == d, "k/v head dimension must equal q's")
        check(H % Hkv == 0, "Number of heads in key/value must divide number of heads in query")
        check(cu_seqlens_q.numel() == cu_seqlens_k.numel() >= 2, "cu_seqlens_q/k: batch_size + 1 entries each")
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for cu, total, mx, name in ((cq, total_q, max_seqlen_q, "q"), (ck, total_k, max_seqlen_k, "k")):
            check(isinstance(mx, int), f"max_seqlen_{name} must be a Python int")
            check(cu[0] == 0 and cu[-1] == total, f"cu_seqlens_{name} must run from 0 to total_{name}")
            lens = [b - a for a, b in zip(cu, cu[1:])]
            check(min(lens) >= 0 and max(lens) <= mx, f"cu_seqlens_{name}: lengths within [0, max_seqlen_{name}]")
        self.calls.append({"dtype": q.dtype, "batch": len(cq) - 1, "causal": causal, "window": window_size})
        win = None if window_size[0] < 0 else window_size[0] + 1
        out = q.new_zeros(total_q, H, d, dtype=torch.float32)
        for (a, b), (c, e) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):  # causal: bottom-right aligned
            if b > a:
                o = attention_ref(q[a:b].float().transpose(0, 1)[None], k[c:e].float().transpose(0, 1)[None],
                                  v[c:e].float().transpose(0, 1)[None],
                                  q_offset=(e - c) - (b - a) if causal else 0, window=win)
                out[a:b] = o[0].transpose(0, 1)
        return out.to(q.dtype)


@contextlib.contextmanager
def on_fake_cuda():
    """Make every tensor report ``is_cuda`` (the dispatch decisions' device test) while the
    fakes stand in for the kernels; undone on exit."""
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True), raising=False)
    try:
        yield
    finally:
        mp.undo()


def install(monkeypatch):
    """Install all five fakes; returns them by kernel name."""
    import seqlm.ops.attention as att
    import seqlm.ops.conv as conv
    import seqlm.ops.selective_scan as sscan
    import seqlm.ops.ssd as ssd

    fakes = {"conv": FakeCausalConv1d(), "scan": FakeSelectiveScan(), "ssd": FakeSSD(), "flash": FakeFlashAttn(),
             "flash_varlen": FakeFlashVarlen()}
    monkeypatch.setattr(conv, "_cc1d_fn", fakes["conv"])
    monkeypatch.setattr(sscan, "_ssfn", fakes["scan"])
    monkeypatch.setattr(ssd, "_mcsc", fakes["ssd"])
    monkeypatch.setattr(att, "_flash_attn_func", fakes["flash"])
    monkeypatch.setattr(att, "_flash_varlen", fakes["flash_varlen"])
    return fakes
