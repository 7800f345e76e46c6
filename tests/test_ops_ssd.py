"""SSD kernel (Mamba-2): chunked scan vs the sequential reference, step, matrix, dispatch."""
import types

import pytest
import torch

from seqlm import ops
from seqlm.ops import ssd
from seqlm.ops.ssd import ssd_matrix, ssd_ref, ssd_scan, ssd_step, ssd_step_ref


def inputs(b=2, L=21, H=4, P=3, N=5, G=2, dtype=torch.float64, dt_scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, L, H, generator=g, dtype=dtype) * dt_scale + 0.01
    A = -(torch.rand(H, generator=g, dtype=dtype) * 4 + 0.5)
    B = torch.randn(b, L, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, L, G, N, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, h0


# ops.BLOCK_ELEMS: one block for everything, or (b=2, L=21, Q=8: 6 chunks of 256 elements)
# blocks of 4 chunks and a ragged block of 2
# ssd.PIVOT_SPAN_DEFAULT: the default (every head on the factorised intra-chunk product),
# 6.0 (log-decay spans per chunk of these inputs are 3-9: some (block, head) pairs take the
# exact per-head decay matrix, some not), 0.0 (all exact)
@pytest.mark.parametrize("pivot_span", [None, 6.0, 0.0])
@pytest.mark.parametrize("block_elems", [1 << 18, 1024])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("G", [1, 2])
def test_scan_matches_ref_values_and_grads(dtype, tol, G, block_elems, pivot_span, monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_ELEMS", block_elems)
    if pivot_span is not None:
        monkeypatch.setattr(ssd, "PIVOT_SPAN_DEFAULT", pivot_span)
    args = [t.requires_grad_() for t in inputs(G=G, dtype=dtype)]
    x, dt, A, B, C, D, h0 = args
    y, h = ssd_scan(x, dt, A, B, C, 8, D, h0)
    yr, hr = ssd_ref(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(h, hr, rtol=tol, atol=tol)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), args)
    want = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), args)
    for name, a, b in zip("x dt A B C D h0".split(), got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10, msg=f"grad {name}")


@pytest.mark.parametrize("pivot_span", [None, 3.0])  # 3.0: mixed at Q = 4, all exact at Q = 7
@pytest.mark.parametrize("Q", [1, 4, 7])
def test_gradcheck_fp64(Q, pivot_span, monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_ELEMS", 2 * Q * 2 * max(2, Q))  # blocks of 2 chunks
    if pivot_span is not None:
        monkeypatch.setattr(ssd, "PIVOT_SPAN_DEFAULT", pivot_span)
    args = [t.requires_grad_() for t in inputs(b=1, L=9, H=2, P=2, N=3, G=1)]
    assert torch.autograd.gradcheck(lambda x, dt, A, B, C, D, h0: ssd_scan(x, dt, A, B, C, Q, D, h0), args)


def test_chunk_size_invariance_including_padding():
    x, dt, A, B, C, D, h0 = inputs(L=37)
    outs = [ssd_scan(x, dt, A, B, C, Q, D, h0) for Q in (1, 3, 5, 8, 16, 37, 64)]
    for y, h in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, outs[0][1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("a", [1, 6, 13])
def test_continuation_from_h0(a):
    x, dt, A, B, C, D, _ = inputs(L=20)
    y, h = ssd_scan(x, dt, A, B, C, 4, D)
    y1, h1 = ssd_scan(x[:, :a], dt[:, :a], A, B[:, :a], C[:, :a], 4, D)
    y2, h2 = ssd_scan(x[:, a:], dt[:, a:], A, B[:, a:], C[:, a:], 4, D, h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(h2, h)


def test_step_equals_scan():
    x, dt, A, B, C, D, h = inputs(L=11)
    y, hl = ssd_scan(x, dt, A, B, C, 4, D, h)
    outs = []
    for t in range(x.shape[1]):
        yt, h = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h, D)
        outs.append(yt)
    torch.testing.assert_close(torch.stack(outs, 1), y)
    torch.testing.assert_close(h, hl)


@pytest.mark.parametrize("G", [1, 2, 4])
def test_step_matches_ref_step_values_and_grads(G):
    x, dt, A, B, C, D, h = inputs(L=1, G=G)
    args = [t.requires_grad_() for t in (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h, D)]
    x1, dt1, A1, B1, C1, h1, D1 = args
    y, hn = ssd_step(x1, dt1, A1, B1, C1, h1, D1)
    yr, hr = ssd_step_ref(x1, dt1, A1, B1, C1, h1, D1)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hn, hr, rtol=1e-12, atol=1e-12)
    gy, gh = torch.randn_like(y), torch.randn_like(hn)
    got = torch.autograd.grad((y * gy).sum() + (hn * gh).sum(), args)
    want = torch.autograd.grad((yr * gy).sum() + (hr * gh).sum(), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a non-contiguous state (e.g. a permuted view) gives the same step
    hp = h.detach().permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not hp.is_contiguous()
    torch.testing.assert_close(ssd_step(x1, dt1, A1, B1, C1, hp, D1)[1], hr)


def test_scan_final_state_is_contiguous():
    x, dt, A, B, C, D, h0 = inputs(L=12)
    assert ssd_scan(x, dt, A, B, C, 4, D, h0)[1].is_contiguous()


def test_strong_decay_stays_finite_and_exact():
    # dt*A down to -80 per token: exp of un-masked segment sums would overflow
    x, dt, A, B, C, D, h0 = inputs(L=40, dt_scale=5.0)
    A = A * 4
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype).requires_grad_() for t in (x, dt, A, B, C, D, h0)]
        y, h = ssd_scan(args[0], args[1], args[2], args[3], args[4], 16, args[5], args[6])
        (y.sum() + h.sum()).backward()
        assert all(torch.isfinite(t.grad).all() for t in args)
    yr, _ = ssd_ref(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 16, D, h0)[0], yr)


def test_pivot_flags_fast_decaying_heads_and_both_paths_agree_with_ref():
    """Heads whose log-decay spans more than PIVOT_SPAN within a chunk take the exact per-head
    decay matrix; the rest the factorised product. Mixed in one call, fp32, default limit."""
    x, dt, A, B, C, D, h0 = inputs(b=1, L=64, H=4, P=3, N=5, G=2, dt_scale=0.5)
    dt = torch.full_like(dt, 0.5)
    A = torch.tensor([-0.5, -6.0, -1.0, -8.0], dtype=A.dtype)  # spans over 16 tokens: 4, 48, 8, 64
    A[3] = -9.0                                                  # 72 > 64
    cum = (dt * A).view(1, 4, 16, 4).cumsum(2)[0]                # (chunks, Q, H)
    _, em, bad = ssd._pivot(cum.float(), [slice(0, 2), slice(2, 4)])
    assert [b.tolist() for b in bad] == [[3], [3]] and torch.all(em[..., 3] == 0) and torch.isfinite(em).all()
    args = [t.float().requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    y, h = ssd_scan(*args[:5], 16, args[5], args[6])
    yr, hr = ssd_ref(*(t.detach().double().requires_grad_() for t in args[:5]), D, h0)
    torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), hr, rtol=1e-4, atol=1e-4)
    (y.sum() + h.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in args)


def test_pivot_span_is_tighter_for_fp16():
    c = torch.linspace(0, -20, 8).view(1, 8, 1).expand(1, 8, 2).contiguous()
    assert ssd._pivot(c, [slice(0, 1)])[2] == [None]
    assert ssd._pivot(c.half(), [slice(0, 1)])[2][0].tolist() == [0, 1]


def test_pivot_marks_exact_heads_per_block_of_chunks():
    # 3 chunks, 2 heads; head 1 spans 100 in chunk 2 only: exact in the second block alone
    c = torch.zeros(3, 4, 2)
    c[2, :, 1] = torch.linspace(0, -100, 4)
    ep, em, heads = ssd._pivot(c, [slice(0, 2), slice(2, 3)])
    assert heads[0] is None and heads[1].tolist() == [1]
    assert torch.all(em[2, :, 1] == 0) and torch.all(em[:2] > 0) and torch.isfinite(ep).all()


def test_matrix_matches_ref():
    x, dt, A, B, C, D, _ = inputs(L=13)
    T = ssd_matrix(dt, A, B, C, D)  # (b, H, L, L)
    assert T.shape == (2, 4, 13, 13)
    assert torch.all(T.triu(1) == 0)
    yr, _ = ssd_ref(x, dt, A, B, C, D)
    torch.testing.assert_close(torch.einsum("bhls,bshp->blhp", T, x), yr)
    # differentiable (MOHAWK stage 1 trains through it)
    dtg = dt.clone().requires_grad_()
    ssd_matrix(dtg, A, B, C, D).square().sum().backward()
    assert torch.isfinite(dtg.grad).all() and dtg.grad.abs().sum() > 0


def test_saved_memory_is_linear_in_length():
    def saved_bytes(L):
        x, dt, A, B, C, D, h0 = [t.float().requires_grad_() for t in inputs(b=1, L=L, H=4, P=8, N=8, G=1)]
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ssd_scan(x, dt, A, B, C, 16, D, h0)
        return sum(total)

    b1, b2, b4 = saved_bytes(256), saved_bytes(512), saved_bytes(1024)
    assert b2 <= 2.05 * b1 and b4 <= 2.05 * b2, (b1, b2, b4)


def test_dispatch_decision(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    cpu = torch.zeros(1)
    monkeypatch.setattr(ssd, "_mcsc", None)
    assert not ssd.use_triton_ssd(cuda_like)
    monkeypatch.setattr(ssd, "_mcsc", lambda *a, **k: None)
    assert ssd.use_triton_ssd(cuda_like, cuda_like)
    assert not ssd.use_triton_ssd(cpu)
    assert not ssd.use_triton_ssd(cuda_like, cpu)


def test_dispatch_calls_fused_kernel_with_our_arguments(monkeypatch):
    """The fake checks mamba_chunk_scan_combined's contract (tests/cuda_fakes.py)."""
    from cuda_fakes import FakeSSD

    x, dt, A, B, C, D, h0 = (t.float() for t in inputs(L=10))
    fake = FakeSSD()
    monkeypatch.setattr(ssd, "_mcsc", fake)
    monkeypatch.setattr(ssd, "use_triton_ssd", lambda *t: True)
    y, h = ssd_scan(x, dt, A, B, C, 4, D, h0)
    assert fake.calls == [{"dtype": torch.float32, "chunk": 4, "state": True}]
    yr, hr = ssd_ref(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, hr, rtol=1e-5, atol=1e-5)


def test_bad_groups_is_a_clear_error():
    x, dt, A, B, C, D, h0 = inputs(H=4, G=2)
    with pytest.raises(ValueError, match="G=3 must divide heads H=4"):
        ssd_scan(x, dt, A, B[..., :1, :].expand(-1, -1, 3, -1), C[..., :1, :].expand(-1, -1, 3, -1), 4)


@pytest.mark.parametrize("pivot_span", [None, 9.0])  # 9.0: heads 0, 1, 3 exact, head 2 factorised
@pytest.mark.parametrize("G", [1, 2])
def test_single_chunk_stateless_path_matches_ref(G, pivot_span, monkeypatch):
    """return_state=False with no h0 and L <= chunk takes the intra-chunk-only kernel."""
    if pivot_span is not None:
        monkeypatch.setattr(ssd, "PIVOT_SPAN_DEFAULT", pivot_span)
    x, dt, A, B, C, D, _ = inputs(G=G, L=13)
    args = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
    y, h = ssd_scan(*args[:5], 16, args[5], None, return_state=False)
    assert h is None
    yr, _ = ssd_ref(*args[:5], args[5])
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    got = torch.autograd.grad((y * gy).sum(), args)
    want = torch.autograd.grad((yr * gy).sum(), args)
    for name, a, b in zip("x dt A B C D".split(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad {name}")
    xs = x.detach()[:1, :6].clone().requires_grad_()
    rest = [t.detach()[:1, :6].clone().requires_grad_() for t in (dt, B, C)]
    for d in (None, D.detach().clone().requires_grad_()):
        assert torch.autograd.gradcheck(
            lambda x_, dt_, A_, B_, C_, *d_: ssd_scan(x_, dt_, A_, B_, C_, 8, *d_, None, return_state=False)[0],
            (xs, rest[0], A.detach().clone().requires_grad_(), rest[1], rest[2], *([] if d is None else [d])))


def test_single_chunk_path_takes_strided_views():
    """x, B, C as column slices of one wide tensor (the conv output in the Mamba-2 block):
    same values and gradients as contiguous copies."""
    x, dt, A, B, C, D, _ = inputs(G=2, L=13)
    b, L, H, P = x.shape
    wide = torch.cat([x.reshape(b, L, -1), B.reshape(b, L, -1), C.reshape(b, L, -1)], -1).requires_grad_()
    xv, Bv, Cv = wide.split([H * P, B.shape[2] * B.shape[3], C.shape[2] * C.shape[3]], -1)
    y, _ = ssd_scan(xv.reshape(x.shape), dt, A, Bv.reshape(B.shape), Cv.reshape(C.shape), 16, D, None,
                    return_state=False)
    yr, _ = ssd_ref(x, dt, A, B, C, D)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * gy).sum(), wide)
    xr, Br, Cr = (t.clone().requires_grad_() for t in (x, B, C))
    want = torch.autograd.grad((ssd_ref(xr, dt, A, Br, Cr, D)[0] * gy).sum(), (xr, Br, Cr))
    torch.testing.assert_close(g, torch.cat([w.reshape(b, L, -1) for w in want], -1), rtol=1e-9, atol=1e-9)
