"""Mamba-1 block: chunked prefill with state == full forward == steps, chunk invariance,
special inits survive init_weights, config errors, a tiny LM learns."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqlm.blocks.mamba import Mamba, MambaConfig
from seqlm.config import ConfigError, parse_config
from seqlm.model import LM

D = 32


def block(**kw):
    torch.manual_seed(0)
    return Mamba(MambaConfig(**{"d_state": 8, "chunk_size": 4, **kw}), D).double()


@pytest.mark.parametrize("a", [1, 4, 9, 18])
def test_forward_equals_two_chunks_and_steps(a):
    blk = block()
    x = torch.randn(2, 19, D, dtype=torch.float64)
    with torch.no_grad():
        ref, none = blk(x)
        st = blk.init_state(2, 19)
        y1, st = blk(x[:, :a], st)
        y2, st = blk(x[:, a:], st)
        steps, st2 = [], blk.init_state(2, 19)
        for t in range(19):
            yt, st2 = blk.step(x[:, t:t + 1], st2)
            steps.append(yt)
    assert none is None
    torch.testing.assert_close(torch.cat([y1, y2], 1), ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(st["ssm"], st2["ssm"])
    torch.testing.assert_close(st["conv"], st2["conv"])
    assert st["ssm"].shape == (2, 2 * D, 8) and st["conv"].shape == (2, 2 * D, 3)


def test_chunk_size_does_not_change_the_block_or_its_grads():
    x = torch.randn(1, 23, D, dtype=torch.float64)
    outs = []
    for q in (1, 4, 16, 64):
        blk = block(chunk_size=q)
        y, _ = blk(x)
        y.square().sum().backward()
        outs.append((y.detach(), blk.A_log.grad.clone(), blk.x_proj.weight.grad.clone()))
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            torch.testing.assert_close(a, b)


def test_special_inits_survive_init_weights():
    blk = Mamba(MambaConfig(dt_min=0.01, dt_max=0.05), 64)
    blk.init_weights(n_layers=8, std=0.02)
    dt = F.softplus(blk.dt_proj.bias)
    assert (dt >= 0.01 - 1e-6).all() and (dt <= 0.05 + 1e-6).all()
    assert dt.std() > 0  # log-uniform, not a constant
    torch.testing.assert_close(-torch.exp(blk.A_log), -torch.arange(1, 17.).expand(128, 16))
    assert torch.all(blk.D == 1)
    assert blk.R == 4 and blk.x_proj.out_features == 4 + 32 and blk.in_proj.out_features == 256
    assert blk.dt_proj.weight.abs().max() <= 4 ** -0.5
    assert blk.out_proj.weight.std() < 0.02 / math.sqrt(16) * 1.5
    assert blk.conv_weight.abs().max() <= 1 / math.sqrt(4)


def test_dt_rank_int():
    assert Mamba(MambaConfig(dt_rank=3), 64).dt_proj.in_features == 3


@pytest.mark.parametrize("field,value,needle", [
    ("dt_rank", 1000, "layers[0].dt_rank: must be <= expand*d_model=128"),
    ("dt_rank", 0, "layers[0].dt_rank"),
    ("dt_rank", "big", "layers[0].dt_rank"),
    ("dt_max", 1e-4, "layers[0].dt_max: must be >= dt_min"),
    ("d_state", 0, "layers[0].d_state"),
    ("chunk_size", 0, "layers[0].chunk_size"),
])
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"d_model": 64, "vocab_size": 10, "layers": [{"type": "mamba", field: value}]}})
    assert needle in str(e.value)


def test_pattern_char_and_tiny_lm_learns():
    cfg = parse_config({"model": {"d_model": 32, "pattern": "M-M-", "vocab_size": 16,
                                  "block_defaults": {"mamba": {"d_state": 8, "chunk_size": 64}}}})
    assert [l.type for l in cfg.model.layers] == ["mamba", "mlp", "mamba", "mlp"]
    torch.manual_seed(0)
    model = LM(cfg.model)
    seq = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]) % 16
    tokens, targets = seq.repeat(4, 2)[:, :-1], seq.repeat(4, 2)[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    got = model.generate(seq[:10], 8, temperature=0)
    ids = seq[:10][None]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ids[0, 10:])
