"""seqlm: long-sequence language modeling in plain PyTorch."""
import os

# PyTorch's CPU allocator asks the kernel for transparent huge pages on allocations of 2 MiB
# and more when THP_MEM_ALLOC_ENABLE is set. Long sequences allocate activations of tens to
# hundreds of MiB per pass; with 4 KiB pages each pass pays a page fault per 4 KiB, which on
# these machines doubled the time of a 32k-token Mamba-2 layer (bench/scaling.py). It is read
# at PyTorch's first large CPU allocation, so it is set here, when seqlm is imported;
# THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
