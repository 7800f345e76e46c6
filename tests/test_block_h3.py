"""H3 block: multi-head form, chunked prefill with state, a tiny hybrid LM learns."""
import pytest
import torch

from seqlm.blocks.h3 import H3, H3Config
from seqlm.config import ConfigError, parse_config
from seqlm.model import LM


@pytest.mark.parametrize("head_dim", [1, 4])
@pytest.mark.parametrize("split", [3, 9])
def test_chunked_forward_and_steps(head_dim, split):
    torch.manual_seed(0)
    blk = H3(H3Config(head_dim=head_dim, d_state=8), 16).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = blk(x)
        st = blk.init_state(2, 13)
        a, st = blk(x[:, :split], st)
        b, st = blk(x[:, split:], st)
        torch.testing.assert_close(torch.cat([a, b], 1), ref)
        st = blk.init_state(2, 13)
        st = blk.init_state(2, 13)
        outs = []
        for t in range(13):
            y, st = blk.step(x[:, t:t + 1], st)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), ref)


def test_long_sequence_matches_short_prefix():
    torch.manual_seed(0)
    blk = H3(H3Config(d_state=8), 8)
    x = torch.randn(1, 1500, 8)
    y, _ = blk(x)
    y2, _ = blk(x[:, :100])
    torch.testing.assert_close(y[:, :100], y2, rtol=1e-4, atol=1e-5)


def test_config_errors_name_field():
    with pytest.raises(ConfigError, match=r"model.layers\[0\].d_state: must be even"):
        parse_config({"model": {"d_model": 32, "layers": [{"type": "h3", "d_state": 7}]}})
    with pytest.raises(ConfigError, match=r"model.layers\[0\].head_dim: must divide d_model=32"):
        parse_config({"model": {"d_model": 32, "layers": [{"type": "h3", "head_dim": 5}]}})


def test_tiny_h3_hybrid_learns():
    torch.manual_seed(0)
    cfg = parse_config({"model": {"d_model": 32, "pattern": "H-*-", "vocab_size": 16,
                                  "block_defaults": {"attention": {"n_heads": 2}}}})
    model = LM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = torch.arange(32) % 7
    x, y = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    first = model.loss(x, y).item()
    for _ in range(30):
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
