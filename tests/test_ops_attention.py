"""Fast attention / RoPE ops vs their obvious references."""
import pytest
import torch

from seqlm.ops.attention import attention, attention_ref
from seqlm.ops.rope import RotaryCache, rope_ref


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("Tq,offset", [(9, 0), (1, 8), (4, 5)])
def test_attention_matches_ref(Hkv, window, Tq, offset):
    torch.manual_seed(0)
    B, H, hd = 2, 4, 8
    Tk = offset + Tq
    q = torch.randn(B, H, Tq, hd, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, hd, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, hd, dtype=torch.float64)
    torch.testing.assert_close(attention(q, k, v, offset, window), attention_ref(q, k, v, offset, window))


@pytest.mark.parametrize("offset", [0, 5])
def test_rope_matches_ref_and_preserves_norm(offset):
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    y = RotaryCache(8).apply(x, offset)
    torch.testing.assert_close(y, rope_ref(x, offset))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rope_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    rc = RotaryCache(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    a = (rc.apply(q, 7) * rc.apply(k, 3)).sum()
    b = (rc.apply(q, 14) * rc.apply(k, 10)).sum()
    torch.testing.assert_close(a, b)
