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


def test_defaults_follow_the_reference():
    """HazyResearch/H3: shift SSM of d_state taps; one diagonal SSM per head (not per channel)."""
    blk = H3(H3Config(head_dim=4), 32)  # d_state 64 by default, H = 8 heads
    assert blk.shift_weight.shape == (32, 64)
    for name in ("log_dt", "D"):
        assert getattr(blk, name).shape == (8,)
    for name in ("A_log_re", "A_im"):
        assert getattr(blk, name).shape == (8, 32)
    assert blk.C_ri.shape == (8, 64)
    assert set(H3.no_weight_decay) == {"log_dt", "A_log_re", "A_im", "D"}
    assert blk.init_state(2, 10)["ssm"].shape == (2, 8, 16, 32)


@pytest.mark.parametrize("disc", ["bilinear", "zoh"])
def test_discretisation_matches_the_recurrence_written_out(disc):
    """The FFT path equals an obvious per-mode loop x_t = a x_{t-1} + b u_t, y = 2 Re(c x_t) + D u."""
    torch.manual_seed(0)
    blk = H3(H3Config(d_state=4, head_dim=2, shift_size=3, discretization=disc), 4).double()
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    with torch.no_grad():
        y, _ = blk(x)
        q, k, v = blk.q_proj(x), blk.k_proj(x), blk.v_proj(x)
        A = torch.complex(-torch.exp(blk.A_log_re), blk.A_im)  # (H, N)
        dt = torch.exp(blk.log_dt)[:, None]
        if disc == "bilinear":
            a, b = (1 + dt * A / 2) / (1 - dt * A / 2), dt / (1 - dt * A / 2)
        else:
            a, b = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A
        c = torch.complex(blk.C_ri[:, :2], blk.C_ri[:, 2:])
        P, H, S = 2, 2, 3
        ks = torch.zeros_like(k)
        for t in range(9):
            for j in range(S):
                if t - j >= 0:
                    ks[:, t] += blk.shift_weight[:, S - 1 - j] * k[:, t - j]
        out = torch.zeros(1, 9, 4, dtype=torch.float64)
        for h in range(H):
            for i in range(P):
                for jj in range(P):
                    st = torch.zeros(2, dtype=torch.complex128)
                    for t in range(9):
                        u = ks[0, t, h * P + i] * v[0, t, h * P + jj]
                        st = a[h] * st + b[h] * u
                        s = 2 * (c[h] * st).sum().real + blk.D[h] * u
                        out[0, t, h * P + jj] += q[0, t, h * P + i] * s
        torch.testing.assert_close(y, blk.out_proj(out))
