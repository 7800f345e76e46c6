"""Gated RMSNorm (Mamba-2's output norm): custom backward vs the obvious formula."""
import pytest
import torch

from seqlm import ops
from seqlm.ops.norm import gated_rms_norm, gated_rms_norm_ref


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("block_elems", [1 << 18, 36])  # one block; blocks of 3 rows (10 rows: ragged end)
@pytest.mark.parametrize("group", [None, 4])
def test_gated_rms_norm_matches_reference_with_gradients(group, block_elems, affine, monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_ELEMS", block_elems)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True) if affine else None
    y = gated_rms_norm(x, z, w, 1e-5, group)
    yr = gated_rms_norm_ref(x, z, w, 1e-5, group)
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    inputs = (x, z, w) if affine else (x, z)
    got = torch.autograd.grad((y * g).sum(), inputs)
    want = torch.autograd.grad((yr * g).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, z, *w: gated_rms_norm(x, z, w[0] if w else None, 1e-5, group),
                                    (x[:1, :2], z[:1, :2], *inputs[2:]))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("group", [None, 4])
def test_gated_rms_norm_inference_path(group, affine):
    torch.manual_seed(1)
    x, z = torch.randn(3, 12), torch.randn(3, 12)
    w = torch.randn(12) if affine else None
    with torch.no_grad():
        torch.testing.assert_close(gated_rms_norm(x, z, w, 1e-5, group), gated_rms_norm_ref(x, z, w, 1e-5, group))
