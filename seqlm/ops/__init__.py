"""Pure-PyTorch kernels, each beside a naive reference (``*_ref``) used by the tests, with
optional dispatch to CUDA libraries (flash-attn, mamba-ssm, causal-conv1d) when present."""

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
