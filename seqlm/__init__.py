"""seqlm: long-sequence language modeling in plain PyTorch."""
from seqlm.cpualloc import configure as _configure_cpu_alloc

# heap reuse for activations up to 32 MiB and huge pages above (seqlm/cpualloc.py: long
# sequences otherwise pay a page fault per 4 KiB of fresh activations on every pass)
CPU_ALLOC = _configure_cpu_alloc()

__version__ = "0.1.0"


def __getattr__(name):
    # seqlm.load / seqlm.save_pretrained without importing the I/O layer on `import seqlm`
    # (so `import seqlm.model` stays free of seqlm.io)
    if name in ("load", "save_pretrained"):
        from seqlm.io import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'seqlm' has no attribute {name!r}")
