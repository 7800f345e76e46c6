"""seqlm: long-sequence language modeling in plain PyTorch."""
__version__ = "0.1.0"
