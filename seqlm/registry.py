"""Block registry: name -> block class, and pattern character -> name.

    @register("mamba2", char="2")
    class Mamba2(Block): ...

Every module in ``seqlm/blocks`` is imported by :func:`load_blocks`, so adding a block is
adding one file; nothing else needs editing.
"""
from __future__ import annotations

import importlib
import pkgutil

_BLOCKS: dict[str, type] = {}
_CHARS: dict[str, str] = {}
_loaded = False


def register(name: str, char: str | None = None):
    """Class decorator: register a Block subclass under ``name`` (and pattern ``char``)."""

    def deco(cls):
        if name in _BLOCKS and _BLOCKS[name] is not cls:
            raise ValueError(f"block type {name!r} registered twice")
        if char is not None:
            if len(char) != 1:
                raise ValueError(f"pattern char for {name!r} must be one character, got {char!r}")
            if char in _CHARS and _CHARS[char] != name:
                raise ValueError(f"pattern char {char!r} already used by {_CHARS[char]!r}")
            _CHARS[char] = name
        cls.name = name
        _BLOCKS[name] = cls
        return cls

    return deco


def load_blocks() -> None:
    """Import every module of seqlm.blocks once so their @register calls run."""
    global _loaded
    if _loaded:
        return
    import seqlm.blocks as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"seqlm.blocks.{mod.name}")
    _loaded = True


def blocks() -> dict[str, type]:
    load_blocks()
    return dict(_BLOCKS)


def get_block(name: str) -> type:
    load_blocks()
    if name not in _BLOCKS:
        raise KeyError(f"unknown block type {name!r}; registered: {sorted(_BLOCKS)}")
    return _BLOCKS[name]


def pattern_chars() -> dict[str, str]:
    """Pattern character -> block type name."""
    load_blocks()
    return dict(_CHARS)
