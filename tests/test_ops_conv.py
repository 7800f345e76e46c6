import torch
import pytest
import torch.nn.functional as F

from seqlm.ops.conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_step


def test_conv_matches_ref_and_state():
    torch.manual_seed(0)
    B, C, L, K = 2, 6, 11, 4
    x = torch.randn(B, C, L, dtype=torch.float64)
    w = torch.randn(C, K, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    ref = causal_conv1d_ref(x, w, b, "silu")
    y, _ = causal_conv1d(x, w, b, None, "silu")
    torch.testing.assert_close(y, ref)
    st = torch.zeros(B, C, K - 1, dtype=torch.float64)
    y1, st = causal_conv1d(x[..., :4], w, b, st, "silu")
    outs = [y1]
    for t in range(4, L):
        yt, st = causal_conv1d_step(x[..., t], w, b, st, "silu")
        outs.append(yt[..., None])
    torch.testing.assert_close(torch.cat(outs, -1), ref)
    torch.testing.assert_close(st, x[..., L - K + 1:])


def test_cuda_dispatch_decision(monkeypatch):
    import seqlm.ops.conv as conv

    x = torch.randn(1, 2, 5)
    monkeypatch.setattr(conv, "_cc1d_fn", None)
    assert not conv.use_cuda_conv(x)
    calls = []
    monkeypatch.setattr(conv, "_cc1d_fn", lambda *a, **k: calls.append(1))
    assert not conv.use_cuda_conv(x)  # CPU tensor: torch path even when the kernel imports
    y, _ = conv.causal_conv1d(x, torch.randn(2, 3))
    assert not calls and y.shape == x.shape


def test_cuda_dispatch_taken_for_cuda_tensors(monkeypatch):
    """With the kernel importable and CUDA tensors, the call goes to causal-conv1d within its
    contract (the fake checks it, tests/cuda_fakes.py) and gives the torch result; a width the
    kernel does not take (5) stays on the torch path."""
    import seqlm.ops.conv as conv
    from cuda_fakes import FakeCausalConv1d, on_fake_cuda

    fake = FakeCausalConv1d()
    monkeypatch.setattr(conv, "_cc1d_fn", fake)
    x = torch.randn(1, 2, 5)
    w3, w5 = torch.randn(2, 3), torch.randn(2, 5)
    ref3, _ = conv.causal_conv1d(x, w3, activation="silu")
    ref5, _ = conv.causal_conv1d(x, w5)
    with on_fake_cuda():
        y3, _ = conv.causal_conv1d(x, w3, activation="silu")
        y5, _ = conv.causal_conv1d(x, w5)
    assert [c["activation"] for c in fake.calls] == ["silu"] and fake.calls[0]["width"] == 3
    torch.testing.assert_close(y3, ref3)
    torch.testing.assert_close(y5, ref5)


def test_token_major_conv_matches_ref_state_and_grads():
    """causal_conv1d_tokens on (B, L, C), including a strided slice input and a carried state."""
    from seqlm.ops.conv import causal_conv1d_tokens

    torch.manual_seed(1)
    B, C, L, K = 2, 5, 9, 4
    wide = torch.randn(B, L, C + 3, dtype=torch.float64)
    x = wide[..., 1:C + 1]  # strided, as a slice of a projection
    w = torch.randn(C, K, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    ref = causal_conv1d_ref(x.transpose(1, 2), w, b, "silu").transpose(1, 2)
    y, st = causal_conv1d_tokens(x, w, b, None, "silu")
    assert st is None
    torch.testing.assert_close(y, ref)
    y1, st = causal_conv1d_tokens(x[:, :3], w, b, torch.zeros(B, C, K - 1, dtype=torch.float64), "silu")
    y2, st = causal_conv1d_tokens(x[:, 3:], w, b, st, "silu")
    torch.testing.assert_close(torch.cat([y1, y2], 1), ref)
    torch.testing.assert_close(st, x[:, L - K + 1:].transpose(1, 2))
    args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
            torch.randn(B, C, K - 1, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_tokens(*a, "silu")[0], args)


@pytest.mark.parametrize("K,L", [(33, 20), (32, 45), (40, 7)])
def test_long_kernel_fft_path_matches_ref_state_seq_idx_and_grads(K, L):
    """Long kernels (H3's 64-tap shift) go through the FFT (ops.conv.use_fft_conv): same outputs,
    carried state, document restarts and gradients as the obvious loop."""
    from seqlm.ops.conv import _ConvTokens, causal_conv1d_tokens, use_fft_conv

    assert use_fft_conv(K, L) and not use_fft_conv(4, L) and not use_fft_conv(K, 2 ** (K // 4 + 1))
    torch.manual_seed(2)
    B, C = 2, 3
    x = torch.randn(B, L, C, dtype=torch.float64)
    w = torch.randn(C, K, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64)
    ref = causal_conv1d_ref(x.transpose(1, 2), w, b, "silu").transpose(1, 2)
    called = []
    orig = _ConvTokens.apply
    _ConvTokens.apply = lambda *a: called.append(1) or orig(*a)  # the loop must not run
    try:
        y, _ = causal_conv1d_tokens(x, w, b, None, "silu")
        torch.testing.assert_close(y, ref)
        cut = L // 2
        y1, st = causal_conv1d_tokens(x[:, :cut], w, b, torch.zeros(B, C, K - 1, dtype=torch.float64), "silu")
        y2, st = causal_conv1d_tokens(x[:, cut:], w, b, st, "silu")
        torch.testing.assert_close(torch.cat([y1, y2], 1), ref)
        full = torch.cat([torch.zeros(B, K - 1, C, dtype=torch.float64), x], 1)
        torch.testing.assert_close(st, full[:, -(K - 1):].transpose(1, 2))
        seq_idx = torch.zeros(B, L, dtype=torch.long)
        seq_idx[0, L // 3:] = 1
        seq_idx[1, 1:] = 1
        seq_idx[1, L - 2:] = 2
        yd, _ = causal_conv1d_tokens(x, w, b, None, "silu", seq_idx)
        rd = causal_conv1d_ref(x.transpose(1, 2), w, b, "silu", seq_idx).transpose(1, 2)
        torch.testing.assert_close(yd, rd)
        st0 = torch.randn(B, C, K - 1, dtype=torch.float64)
        ys, sts = causal_conv1d_tokens(x, w, b, st0, "silu", seq_idx)
        with_state = torch.cat([st0.transpose(1, 2), x], 1)
        si = F.pad(seq_idx, (K - 1, 0))
        rs = causal_conv1d_ref(with_state.transpose(1, 2), w, b, "silu", si).transpose(1, 2)[:, K - 1:]
        torch.testing.assert_close(ys, rs)
        last = (si[:, -(K - 1):] == seq_idx[:, -1:]).to(x.dtype)[:, None]
        torch.testing.assert_close(sts, with_state[:, -(K - 1):].transpose(1, 2) * last)
        args = (x[:, :9].clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
                torch.randn(B, C, K - 1, dtype=torch.float64, requires_grad=True))
        assert torch.autograd.gradcheck(lambda *a: causal_conv1d_tokens(*a, "silu")[0], args)
    finally:
        _ConvTokens.apply = orig
    assert not called
