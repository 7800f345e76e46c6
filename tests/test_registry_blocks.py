"""Registry-wide contract: every registered block, same checks (DESIGN.md).

shapes; gradients reach every parameter; forward over T tokens == T calls of step ==
chunked prefill + steps == forward in two chunks with the carried state; tp_plan covers
every 2-D weight.
"""
import re

import pytest
import torch

from seqlm.blocks.plan import Split, as_spec, local_ranges

from seqlm import registry

D, B, T = 32, 2, 12
NAMES = sorted(registry.blocks())


def make(name, dtype=torch.float64):
    cls = registry.get_block(name)
    torch.manual_seed(0)
    blk = cls(cls.Config(), D).to(dtype)
    return blk


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_grads(name):
    blk = make(name, torch.float32)
    x = torch.randn(B, T, D, requires_grad=True)
    y, st = blk(x)
    assert y.shape == (B, T, D)
    assert st is None
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in blk.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} gradient is all zero"


@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_steps(name):
    blk = make(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = blk(x)
        st = blk.init_state(B, T, x.device, x.dtype)
        outs = []
        for t in range(T):
            y, st = blk.step(x[:, t:t + 1], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_steps(name):
    blk = make(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = blk(x)
        st = blk.init_state(B, T, x.device, x.dtype)
        y1, st = blk(x[:, : T // 2], st)
        outs = [y1]
        for t in range(T // 2, T):
            y, st = blk.step(x[:, t:t + 1], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-7, atol=1e-9)


def _tensors(state):
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)


@pytest.mark.parametrize("name", NAMES)
def test_states_are_contiguous(name):
    # one layout for the state whether it came from init_state, a prefill or a step, so a
    # compiled step (LM.compiled_step) sees the same strides every call and never recompiles
    blk = make(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        st0 = blk.init_state(B, T + 1, x.device, x.dtype)
        _, st1 = blk(x[:, :T - 1], blk.init_state(B, T + 1, x.device, x.dtype))
        _, st2 = blk.step(x[:, T - 1:], st1)
    for s in (st0, st1, st2):
        for t in _tensors(s):
            assert t.is_contiguous(), f"{name}: state tensor {tuple(t.shape)} strides {t.stride()}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", [1, 5, 7])
def test_two_chunks_with_state(name, split):
    blk = make(name)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = blk(x)
        st = blk.init_state(B, T, x.device, x.dtype)
        y1, st = blk(x[:, :split], st)
        y2, st = blk(x[:, split:], st)
    torch.testing.assert_close(torch.cat([y1, y2], 1), ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_tp_plan_covers_every_parameter(name):
    blk = make(name, torch.float32)
    for tp in (1, 2):
        plan = {k: as_spec(v) for k, v in blk.tp_plan(tp).items()}
        for pname, p in blk.named_parameters():
            hits = [k for k in plan if re.fullmatch(k, pname)]
            assert hits, f"{name}: tp_plan does not cover parameter {pname!r}"
            assert len(hits) == 1, f"{name}: {pname!r} matched by several plan entries {hits}"
            spec = plan[hits[0]]
            if isinstance(spec, Split):  # parts add up and cut evenly over tp ranks
                rng = local_ranges(spec, p.shape[spec.dim], tp, tp - 1)
                assert all(0 <= a < b <= p.shape[spec.dim] for a, b, _ in rng)


def test_pattern_chars_unique_and_registered():
    chars = registry.pattern_chars()
    assert set(chars.values()) <= set(registry.blocks())
    assert chars["*"] == "attention" and chars["-"] == "mlp"


@pytest.mark.parametrize("T_", [T, 80])  # 80 > the default SSD/scan chunk: the chunked paths
@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name, T_):
    """train.dtype=bf16: under autocast the block trains (the kernels' custom autograd
    Functions used to get bf16 matmul outputs in forward and fp32 in backward) and its
    output stays within bf16 rounding of the fp32 one."""
    blk = make(name, torch.float32)
    x = torch.randn(B, T_, D)
    g = torch.randn(B, T_, D)
    y32, _ = blk(x)
    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = blk(xa)
    assert y.shape == (B, T_, D)
    scale = y32.abs().max().item()
    assert (y.float() - y32).abs().max().item() <= 5e-2 * scale
    (y.float() * g).sum().backward()
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().sum() > 0
    for pname, p in blk.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("d_conv", [2, 5])
@pytest.mark.parametrize("name,extra", [("mamba", {}), ("mamba2", {"ngroups": 2, "head_dim": 8})])
def test_ssm_config_variants_forward_equals_steps(name, extra, bias, conv_bias, d_conv):
    """Mamba-1/Mamba-2 with non-default bias / conv_bias / d_conv: forward == steps, and every
    parameter (and only the configured ones) gets a gradient."""
    cls = registry.get_block(name)
    torch.manual_seed(0)
    blk = cls(cls.Config(d_state=8, chunk_size=4, bias=bias, conv_bias=conv_bias, d_conv=d_conv, **extra),
              D).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, _ = blk(x)
    st, steps = blk.init_state(B, T), []
    with torch.no_grad():
        for t in range(T):
            yt, st = blk.step(x[:, t:t + 1], st)
            steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y.detach(), rtol=1e-9, atol=1e-11)
    (y * torch.randn_like(y)).sum().backward()
    assert all(p.grad is not None for p in blk.parameters())
    assert (blk.conv_bias is not None) == conv_bias and (blk.in_proj.bias is not None) == bias


@pytest.mark.parametrize("name", NAMES)
def test_empty_input(name):
    """T=0: every block returns an empty (B, 0, D) output (Mamba-2 raised IndexError /
    ZeroDivisionError and H3 a math domain error in its FFT conv), keeps the state it was
    given, and gradients still flow (all zero)."""
    blk = make(name, torch.float32)
    x = torch.zeros(B, 0, D, requires_grad=True)
    y, st = blk(x)
    assert y.shape == (B, 0, D) and st is None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        s0 = blk.init_state(B, 8, x.device, x.dtype)
        y, s1 = blk(torch.zeros(B, 0, D), s0)
        assert y.shape == (B, 0, D)
        xs = torch.randn(B, 3, D)
        ref, _ = blk(xs, blk.init_state(B, 8, x.device, x.dtype))
        got, _ = blk(xs, s1)  # the state after nothing is the initial state
    torch.testing.assert_close(got, ref)
