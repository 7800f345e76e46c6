"""Selective scan (Mamba-1): chunked kernel vs the sequential reference, gradients, state
continuation, stability, linear saved memory, CUDA dispatch decision."""
import types

import pytest
import torch

from seqlm.ops import selective_scan as ss
from seqlm.ops.selective_scan import selective_scan, selective_scan_ref, selective_scan_step


def inputs(b=2, L=19, Dm=5, N=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta, z = r(b, L, Dm), r(b, L, Dm), r(b, L, Dm)
    A = -torch.rand(Dm, N, generator=g, dtype=dtype) * 3 - 0.1
    B, C = r(b, L, N), r(b, L, N)
    D, bias, h0 = r(Dm), r(Dm), r(b, Dm, N)
    return u, delta, A, B, C, D, z, bias, h0


def run(fn, ts, **kw):
    u, delta, A, B, C, D, z, bias, h0 = ts
    y, h = fn(u, delta, A, B, C, D, z, bias, True, h0, **kw)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * w).sum() + (h * h.detach().sign()).sum()
    return y, h, torch.autograd.grad(loss, [t for t in ts if t.requires_grad])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_matches_reference_with_grads(dtype, tol, chunk):
    ts = [t.requires_grad_() for t in inputs(dtype=dtype)]
    y, h, g = run(selective_scan, ts, chunk=chunk)
    yr, hr, gr = run(selective_scan_ref, ts)
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(h, hr, rtol=tol, atol=tol)
    for a, b, name in zip(g, gr, "u delta A B C D z bias h0".split()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("softplus", [True, False])
def test_optional_arguments_with_grads(softplus):
    u, delta, A, B, C, *_ = (t.requires_grad_() for t in inputs())
    outs = []
    for fn in (selective_scan, selective_scan_ref):
        y, h = fn(u, delta.exp(), A, B, C, delta_softplus=softplus, chunk=4)
        g = torch.autograd.grad((y * y.detach().cos()).sum() + h.sum(), [u, delta, A, B, C])
        outs.append((y, h, *g))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_gradcheck_tiny():
    ts = [t.requires_grad_() for t in inputs(b=1, L=5, Dm=2, N=2)]
    u, delta, A, B, C, D, z, bias, h0 = ts

    def f(*a):
        y, h = selective_scan(*a[:8], True, a[8], chunk=2)
        return y, h

    assert torch.autograd.gradcheck(f, ts)


def test_chunk_size_invariance():
    ts = inputs(L=23)
    outs = [selective_scan(*ts[:8], True, ts[8], chunk=q) for q in (1, 3, 8, 23, 100)]
    for y, h in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, outs[0][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a", [1, 8, 15])
def test_state_continuation(a):
    u, delta, A, B, C, D, z, bias, h0 = inputs(L=16)
    y, h = selective_scan(u, delta, A, B, C, D, z, bias, True, h0, chunk=4)
    sl = lambda t, s: t[:, s]  # noqa: E731
    y1, h1 = selective_scan(*(sl(t, slice(0, a)) for t in (u, delta)), A, sl(B, slice(0, a)),
                            sl(C, slice(0, a)), D, sl(z, slice(0, a)), bias, True, h0, chunk=4)
    y2, h2 = selective_scan(*(sl(t, slice(a, None)) for t in (u, delta)), A, sl(B, slice(a, None)),
                            sl(C, slice(a, None)), D, sl(z, slice(a, None)), bias, True, h1, chunk=4)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(h2, h)


def test_step_matches_scan():
    u, delta, A, B, C, D, z, bias, h0 = inputs(L=6)
    y, h = selective_scan(u, delta, A, B, C, D, z, bias, True, h0)
    hs, ys = h0, []
    for t in range(6):
        yt, hs = selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], hs, D, z[:, t], bias)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(hs, h)


def test_fp32_stable_with_large_decays():
    # delta*A down to about -3000 per token: a log-space cumsum (exp(-S)) would overflow
    u, delta, A, B, C, D, z, bias, h0 = inputs(L=40, dtype=torch.float64)
    A = A * 100
    delta = delta + 3.0
    yr, hr = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0)
    y, h = selective_scan(*(t.float() for t in (u, delta, A, B, C, D, z, bias)), True, h0.float(), chunk=32)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), hr, rtol=1e-4, atol=1e-4)


def test_saved_memory_is_linear_in_length_and_small():
    def saved_bytes(L):
        ts = [t.float().requires_grad_() for t in inputs(b=1, L=L, Dm=64, N=16)]
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan(*ts[:8], True, ts[8], chunk=64)
        return sum(total)

    b1, b2, b4 = saved_bytes(256), saved_bytes(512), saved_bytes(1024)
    assert b2 <= 2.05 * b1 and b4 <= 2.05 * b2, (b1, b2, b4)
    # well below the (L, Dm, N) tensor of all states (a few (L, Dm) tensors + chunk states)
    assert b4 < 0.6 * 1024 * 64 * 16 * 4, b4


def test_bad_shapes_and_chunk_are_clear_errors():
    u, delta, A, B, C, *_ = inputs()
    with pytest.raises(ValueError, match="do not agree"):
        selective_scan(u, delta, A, B[..., :2], C)
    with pytest.raises(ValueError, match="chunk must be > 0"):
        selective_scan(u, delta, A, B, C, chunk=0)


def test_dispatch_decision(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    cpu = torch.zeros(1)
    monkeypatch.setattr(ss, "_ssfn", None)
    assert not ss._use_cuda_kernel(cuda_like)
    monkeypatch.setattr(ss, "_ssfn", lambda *a, **k: None)
    assert ss._use_cuda_kernel(cuda_like, cuda_like)
    assert not ss._use_cuda_kernel(cpu)
    assert not ss._use_cuda_kernel(cuda_like, cpu)


def test_dispatch_calls_cuda_kernel_with_its_layout(monkeypatch):
    """The fake checks selective_scan_fn's contract (tests/cuda_fakes.py): fp32 in, bf16 model
    (A, D, delta bias cast to fp32), fp64 falls back, an initial state falls back."""
    from cuda_fakes import FakeSelectiveScan

    fake = FakeSelectiveScan()
    monkeypatch.setattr(ss, "_ssfn", fake)
    monkeypatch.setattr(ss, "_use_cuda_kernel", lambda *t: True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        u, delta, A, B, C, D, z, bias, h0 = inputs(L=10, dtype=dtype)
        y, h = selective_scan(u, delta, A, B, C, D, z, bias, True)
        f = lambda t: t.double()  # noqa: E731
        yr, hr = selective_scan_ref(*(f(t) for t in (u, delta, A, B, C, D, z, bias)), True)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
        torch.testing.assert_close(h.double(), hr, rtol=tol, atol=tol)
    assert [c["dtype"] for c in fake.calls] == [torch.float32, torch.bfloat16]
    u, delta, A, B, C, D, z, bias, h0 = inputs(L=10)  # fp64: the kernel has no fp64
    selective_scan(u, delta, A, B, C, D, z, bias, True)
    # an initial state is not supported by the CUDA kernel: the CPU path runs instead
    selective_scan(*(t.float() for t in (u, delta, A, B, C, D, z, bias)), True, h0.float())
    assert len(fake.calls) == 2


def test_fp32_under_autocast():
    """Defect 5: under bf16 autocast the scan's forward ran its einsum/matmul in bf16 (relative
    error ~4e-3) while its backward ran in fp32. With fp32 inputs the scan must compute in fp32
    whether or not autocast is on: output, state and gradients agree to fp32 rounding."""
    ts = [t.requires_grad_() for t in inputs(b=2, L=80, Dm=16, N=8, dtype=torch.float32)]
    y32, h32, g32 = run(selective_scan, ts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h, g = run(selective_scan, ts)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(y, y32) < 1e-6 and rel(h, h32) < 1e-6
    for a, b in zip(g, g32):
        assert rel(a, b) < 1e-6
