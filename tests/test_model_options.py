"""Model options added for imported architectures, each against an obvious reference:
learned absolute positions, parallel residual, partial rotary, MLP activations, Mamba-2 dt clamps."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqlm.config import ConfigError, parse_config
from seqlm.model import LM

V = 23


def lm(**model):
    torch.manual_seed(0)
    return LM(parse_config({"model": {"d_model": 32, **model}}).model, V).double().eval()


def steps_equal_forward(m, T=10, prefill=4):
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref, _ = m(ids)
        st = m.init_state(2, T)
        out, st = m(ids[:, :prefill], st)
        outs = [out]
        for t in range(prefill, T):
            y, st = m.step(ids[:, t:t + 1], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-9, atol=1e-10)
    return ids, ref


def test_learned_positions():
    m = lm(pattern="*-", norm="layernorm", pos_embedding="learned", max_positions=12,
           block_defaults={"attention": {"rope": False}})
    ids, ref = steps_equal_forward(m)
    with torch.no_grad():  # reference: embeddings + positions, then the stack
        x = m.embed(ids) + m.pos_embed.weight[:ids.shape[1]]
        h, _ = m.stack(x)
        torch.testing.assert_close(m.head(m.norm_f(h)), ref)
        with pytest.raises(ValueError, match="model.max_positions: the model reads at most 12"):
            m(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.max_positions: required"):
        parse_config({"model": {"pattern": "*-", "pos_embedding": "learned"}})
    with pytest.raises(ConfigError, match="model.pos_embedding: learned positions are not supported with memory"):
        parse_config({"model": {"pattern": "*-", "pos_embedding": "learned", "max_positions": 8},
                      "memory": {"segment_len": 4, "n_sensory": 1}})


def test_parallel_residual():
    m = lm(pattern="*-", n_layers=4, parallel_residual=True)
    ids, ref = steps_equal_forward(m)
    with torch.no_grad():
        x = m.embed(ids)
        for i in range(0, 4, 2):  # r = r + f_i(n_i(r)) + f_i+1(n_i+1(r))
            a, _ = m.stack.blocks[i](m.stack.norms[i](x))
            b, _ = m.stack.blocks[i + 1](m.stack.norms[i + 1](x))
            x = x + a + b
        torch.testing.assert_close(m.head(m.norm_f(x)), ref)
    with pytest.raises(ConfigError, match="parallel_residual: needs an even number of layers"):
        parse_config({"model": {"pattern": "*-*", "parallel_residual": True}})
    with pytest.raises(ConfigError, match="parallel_residual: only with residual: standard"):
        parse_config({"model": {"pattern": "*-", "parallel_residual": True, "residual": "ladder"}})


def test_partial_rotary():
    from seqlm.ops.rope import rope_ref

    m = lm(pattern="*-", block_defaults={"attention": {"n_heads": 2, "rotary_dim": 6}})
    steps_equal_forward(m)
    att = m.stack.blocks[0]
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        q, k, _ = att._qkv(x, 3)                                    # (B, H, T, hd)
        raw = att.qkv_proj(x).view(1, 5, 6, 16)[:, :, :2]          # the q heads before rotation
        want = torch.cat([rope_ref(raw[..., :6], 3), raw[..., 6:]], -1).transpose(1, 2)
    torch.testing.assert_close(q, want)
    full = lm(pattern="*-", block_defaults={"attention": {"rotary_dim": 8}})
    same = lm(pattern="*-")
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(full(ids)[0], same(ids)[0])
    with pytest.raises(ConfigError, match=r"layers\[0\].rotary_dim: must be even"):
        parse_config({"model": {"pattern": "*", "block_defaults": {"attention": {"rotary_dim": 5}}}})


@pytest.mark.parametrize("kind,fn", [
    ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
    ("gelu_tanh", lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))),
    ("relu2", lambda h: torch.clamp(h, min=0) ** 2),
])
def test_mlp_kinds(kind, fn):
    from seqlm.blocks.mlp import MLP, MLPConfig

    torch.manual_seed(0)
    blk = MLP(MLPConfig(kind=kind, hidden=20, bias=True), 8).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    y, _ = blk(x)
    torch.testing.assert_close(y, blk.out_proj(fn(blk.up_proj(x))))


def test_mamba2_dt_clamp():
    from seqlm.blocks.mamba2 import Mamba2, Mamba2Config

    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    base = Mamba2(Mamba2Config(d_state=4, head_dim=8, chunk_size=4), 32).double()
    clamped = Mamba2(Mamba2Config(d_state=4, head_dim=8, chunk_size=4, dt_floor=0.05, dt_ceil=0.08), 32).double()
    clamped.load_state_dict(base.state_dict())
    with torch.no_grad():
        zxbcdt = F.linear(x, base.in_proj.weight)
        dt = F.softplus(zxbcdt[..., -base.H:] + base.dt_bias)
        assert ((dt < 0.05) | (dt > 0.08)).any()  # the clamp is active here
        y0, _ = base(x)
        y1, _ = clamped(x)
        assert (y0 - y1).abs().max() > 1e-6
        st, outs = clamped.init_state(2, 9), []
        for t in range(9):
            yt, st = clamped.step(x[:, t:t + 1], st)
            outs.append(yt)
    torch.testing.assert_close(torch.cat(outs, 1), y1, rtol=1e-9, atol=1e-11)
