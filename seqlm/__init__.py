"""seqlm: long-sequence language modeling in plain PyTorch.

Importing seqlm changes no process-wide setting. seqlm's own entry points (the ``seqlm`` CLI,
``train.py``, the benches) tune the CPU allocator (seqlm/cpualloc.py: heap reuse for
activations up to 32 MiB, huge pages above); a host program opts in with
:func:`configure_cpu_allocator` (``SEQLM_CPU_ALLOC=0`` opts out everywhere).
"""
from seqlm import cpualloc as _cpualloc

__version__ = "0.1.0"


def configure_cpu_allocator() -> dict:
    """Apply seqlm's CPU allocator settings to this process (once); returns what was done."""
    return _cpualloc.apply_entry_point()


def __getattr__(name):
    if name == "CPU_ALLOC":  # what the allocator setup did in this process ({} when not applied)
        return _cpualloc.APPLIED
    # seqlm.load / seqlm.save_pretrained without importing the I/O layer on `import seqlm`
    # (so `import seqlm.model` stays free of seqlm.io)
    if name in ("load", "save_pretrained"):
        from seqlm.io import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'seqlm' has no attribute {name!r}")
