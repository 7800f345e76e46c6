"""Ladder residual (Zhang et al.) as a stack topology: every registered block type runs under
``residual: ladder``; forward == step-by-step == chunked prefill + steps; the ordering matches a
hand-written recurrence; it is a different function from the standard residual on the same weights."""
import pytest
import torch

from seqlm import registry
from seqlm.config import ConfigError, parse_config
from seqlm.model import LM

V, B, T = 17, 2, 11
NAMES = sorted(registry.blocks())
CHAR = {name: c for c, name in registry.pattern_chars().items()}


def make(name, residual="ladder", recursive=None, seed=0):
    pattern = CHAR[name] + ("" if name == "mlp" else "-")
    m = {"d_model": 32, "pattern": pattern, "n_layers": 3 * len(pattern), "residual": residual,
         "block_defaults": {"attention": {"n_heads": 2}}}
    if recursive:
        m["recursive"] = recursive
    torch.manual_seed(seed)
    model = LM(parse_config({"model": m}).model, V).double().eval()
    with torch.no_grad():  # non-trivial norms and LoRA (fresh LoRA B is zero)
        for n, p in model.named_parameters():
            if n.startswith("stack.norms") or "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def steps(model, x, st, start=0):
    outs = []
    for t in range(start, x.shape[1]):
        y, st = model.step(x[:, t:t + 1], st)
        outs.append(y)
    return outs


def ladder_ref(model, x):
    """The recurrence written out: sub-layer i reads x + out_0 + ... + out_{i-2}."""
    h = model.embed(x)
    outs = []
    for i in range(len(model.stack)):
        norm, blk, ctx = model.stack.layer(i)
        inp = h + sum(outs[:-1]) if len(outs) > 1 else h
        with ctx:
            outs.append(blk(norm(inp))[0])
    return model.head(model.norm_f(h + sum(outs)))


@pytest.mark.parametrize("name", NAMES)
def test_ladder_forward_equals_steps_and_prefill(name):
    model = make(name)
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref, _ = model(x)
        torch.testing.assert_close(ladder_ref(model, x), ref, rtol=1e-10, atol=1e-12)
        stepped = torch.cat(steps(model, x, model.init_state(B, T)), 1)
        st = model.init_state(B, T)
        y1, st = model(x[:, :5], st)
        y2, st = model(x[:, 5:8], st)
        rest = steps(model, x, st, 8)
    torch.testing.assert_close(stepped, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.cat([y1, y2] + rest, 1), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_ladder_differs_from_standard_on_the_same_weights(name):
    lad = make(name)
    std = make(name, residual="standard")
    std.load_state_dict(lad.state_dict())  # same parameters: the conversion is a plain load
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        a, b = lad(x)[0], std(x)[0]
    assert (a - b).abs().amax() > 1e-4


def test_ladder_under_recursive_sharing_steps():
    model = make("mamba2", recursive={"groups": 2, "lora_rank": 3})
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref, _ = model(x)
        stepped = torch.cat(steps(model, x, model.init_state(B, T)), 1)
    torch.testing.assert_close(stepped, ref, rtol=1e-8, atol=1e-10)


def test_ladder_grads_reach_every_parameter():
    model = make("attention").float().train()
    x = torch.randint(0, V, (B, T))
    model.loss(x, x).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_residual_field_validates():
    with pytest.raises(ConfigError, match=r"model\.residual"):
        parse_config({"model": {"pattern": "*-", "residual": "staircase"}})
