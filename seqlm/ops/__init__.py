"""Pure-PyTorch kernels, each beside a naive reference (``*_ref``) used by the tests, with
optional dispatch to CUDA libraries (flash-attn, mamba-ssm, causal-conv1d) when present."""
from __future__ import annotations

import functools

import torch

# Long inputs are processed in blocks of about this many elements (1 MiB in fp32): a block's
# intermediates stay in cache between an op's elementwise passes and small matrix products.
# Whole-tensor passes over a long sequence are bound by memory bandwidth on CPU; blocking
# made the gated RMSNorm ~2x and the SSD scan ~1.5x faster at 4096 x 512 (seqlm.ops.norm,
# seqlm.ops.ssd).
BLOCK_ELEMS = 1 << 18


def blocks(n: int, per_item: int) -> list[slice]:
    """Slices covering ``range(n)`` in runs of about BLOCK_ELEMS // per_item items."""
    step = max(1, BLOCK_ELEMS // max(per_item, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def no_autocast(fn):
    """Run a kernel entry point outside autocast, its floating tensor arguments promoted to
    one dtype (fp32 for bf16 activations with fp32 parameters).

    Under autocast (``train.dtype: bf16``) projections hand the kernels bf16 activations while
    parameters stay fp32, and autocast would recast the matrix products inside a custom
    autograd Function's forward but not in its backward, which runs without autocast: the two
    would disagree on dtypes. Used on the entry points whose Functions mix bf16 activations
    with fp32 weights (``ssd_scan``, ``causal_conv1d_tokens``); the selective scan and the FFT
    convolution already compute in fp32 themselves."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ts = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not ts or not torch.is_autocast_enabled(ts[0].device.type):
            return fn(*args, **kwargs)
        dt = functools.reduce(torch.promote_types, (t.dtype for t in ts if t.is_floating_point()))

        def cast(a):
            return a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(ts[0].device.type, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return wrapper
