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
