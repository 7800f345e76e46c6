"""Pure-PyTorch kernels, each beside a naive reference (``*_ref``) used by the tests, with
optional dispatch to CUDA libraries (flash-attn, mamba-ssm, causal-conv1d) when present."""
