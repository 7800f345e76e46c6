"""Mamba-2 block: chunked prefill with state, config errors, init ranges, a tiny LM trains."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqlm.blocks.mamba2 import Mamba2, Mamba2Config
from seqlm.config import ConfigError, parse_config
from seqlm.model import LM

D = 32


def block(**kw):
    torch.manual_seed(0)
    return Mamba2(Mamba2Config(**{"d_state": 8, "head_dim": 8, "chunk_size": 4, **kw}), D).double()


@pytest.mark.parametrize("a", [1, 4, 9, 18])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_forward_equals_two_chunks_with_state(a, ngroups):
    blk = block(ngroups=ngroups)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    with torch.no_grad():
        ref, none = blk(x)
        st = blk.init_state(2, 19)
        y1, st = blk(x[:, :a], st)
        y2, st = blk(x[:, a:], st)
        steps = []
        st2 = blk.init_state(2, 19)
        for t in range(19):
            yt, st2 = blk.step(x[:, t:t + 1], st2)
            steps.append(yt)
    assert none is None
    torch.testing.assert_close(torch.cat([y1, y2], 1), ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(st["ssm"], st2["ssm"])
    torch.testing.assert_close(st["conv"], st2["conv"])
    assert st["ssm"].shape == (2, blk.H, 8, 8) and st["conv"].shape == (2, blk.conv_dim, 3)


def test_chunk_size_does_not_change_the_block():
    x = torch.randn(1, 23, D, dtype=torch.float64)
    outs = [block(chunk_size=q)(x)[0] for q in (1, 4, 16, 64)]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0])


def test_init_ranges():
    blk = Mamba2(Mamba2Config(dt_min=0.01, dt_max=0.05, A_init_range=(2.0, 3.0)), 64)
    dt = F.softplus(blk.dt_bias)
    assert (dt >= 0.01 - 1e-6).all() and (dt <= 0.05 + 1e-6).all()
    A = -torch.exp(blk.A_log)
    assert (A <= -2.0 + 1e-5).all() and (A >= -3.0 - 1e-5).all()
    assert torch.all(blk.D == 1) and blk.H == 4 and blk.in_proj.out_features == 2 * 128 + 2 * 64 + 4
    assert blk.conv_weight.abs().max() <= 1 / math.sqrt(4)


@pytest.mark.parametrize("field,value,needle", [
    ("head_dim", 48, "layers[0].head_dim: must divide expand*d_model=128"),
    ("ngroups", 3, "layers[0].ngroups: must divide the number of heads 4"),
    ("A_init_range", [4.0, 1.0], "layers[0].A_init_range"),
    ("dt_max", 1e-4, "layers[0].dt_max: must be >= dt_min"),
    ("d_state", 0, "layers[0].d_state"),
])
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"d_model": 64, "vocab_size": 10,
                                "layers": [{"type": "mamba2", field: value}]}})
    assert needle in str(e.value)


def test_direct_construction_checks_too():
    with pytest.raises(ValueError, match="head_dim: must divide"):
        Mamba2(Mamba2Config(head_dim=48), 64)


def test_tiny_hybrid_lm_learns_a_sequence():
    cfg = parse_config({"model": {"d_model": 32, "pattern": "2-2-", "vocab_size": 16,
                                  "block_defaults": {"mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 8}}}})
    torch.manual_seed(0)
    model = LM(cfg.model)
    seq = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]) % 16
    tokens = seq.repeat(4, 2)[:, :-1]
    targets = seq.repeat(4, 2)[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # cached generation continues the learnt sequence exactly like full recompute
    got = model.generate(seq[:10], 8, temperature=0)
    ids = seq[:10][None]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ids[0, 10:])
