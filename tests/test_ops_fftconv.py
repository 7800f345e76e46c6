"""FFT long convolution and the diagonal-SSM kernel vs their direct references."""
import pytest
import torch

from seqlm.ops.fftconv import diag_ssm_kernel, diag_ssm_kernel_ref, fft_conv, fft_conv_ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_fft_conv_matches_direct_sum_with_grads(dtype, tol):
    torch.manual_seed(0)
    u = torch.randn(2, 3, 17, dtype=dtype, requires_grad=True)
    k = torch.randn(3, 17, dtype=dtype, requires_grad=True)
    D = torch.randn(3, dtype=dtype, requires_grad=True)
    y, yr = fft_conv(u, k, D), fft_conv_ref(u, k, D)
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (u, k, D), g)
    gb = torch.autograd.grad(yr, (u, k, D), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fft_conv_gradcheck():
    u = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fft_conv(a, b), (u, k))


def test_fft_conv_is_causal():
    u = torch.randn(1, 2, 32)
    k = torch.randn(2, 32)
    y1 = fft_conv(u, k)
    u2 = u.clone()
    u2[..., 20:] = torch.randn(1, 2, 12)
    torch.testing.assert_close(fft_conv(u2, k)[..., :20], y1[..., :20])


@pytest.mark.parametrize("block", [4, 16, None])
def test_diag_kernel_matches_explicit_powers(block):
    torch.manual_seed(0)
    log_a = torch.complex(-torch.rand(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    w = torch.randn(3, 4, dtype=torch.complex128)
    K = diag_ssm_kernel(log_a, w, 11, block=block)
    torch.testing.assert_close(K, diag_ssm_kernel_ref(torch.exp(log_a), w, 11))


def test_diag_kernel_blocked_grads_equal_single_block():
    torch.manual_seed(0)
    re = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    im = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def k(chunk):
        return diag_ssm_kernel(torch.complex(-re, im), torch.complex(im, re), 20, block=chunk)

    g = torch.randn(3, 20, dtype=torch.float64)
    a = torch.autograd.grad((k(6) * g).sum(), (re, im))
    b = torch.autograd.grad((k(20) * g).sum(), (re, im))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_fft_conv_hand_written_backward_gradcheck_short_kernel_and_skip():
    """fft_conv's backward is written by hand (correlations by FFT): gradcheck with a kernel
    shorter than the input and the skip D."""
    u = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_conv, (u, k, D))
