"""seqlm: long-sequence language modeling in plain PyTorch."""
from seqlm.cpualloc import configure as _configure_cpu_alloc

# heap reuse for activations up to 32 MiB and huge pages above (seqlm/cpualloc.py: long
# sequences otherwise pay a page fault per 4 KiB of fresh activations on every pass)
CPU_ALLOC = _configure_cpu_alloc()

__version__ = "0.1.0"
