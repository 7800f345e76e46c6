import torch

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
