"""Block registry: name -> block class, and pattern character -> name.

    @register("mamba2", char="2")
    class Mamba2(Block): ...

Every module in ``seqlm/blocks`` is imported by :func:`load_blocks`, so adding a block is
adding one file; nothing else needs editing.

Blocks from outside seqlm register the same way, after seqlm is imported:
- a package declares an entry point in the group ``seqlm.blocks`` (``pyproject.toml``:
  ``[project.entry-points."seqlm.blocks"] myblock = "mypkg.myblock"``); :func:`load_blocks`
  imports every such module (or object) once, so its ``@register`` runs;
- a script calls ``@register("myblock", char="X")`` before it loads a config.
Configs look block types up when they are validated, so both work in YAML, pattern strings,
the CLI and the registry-wide test. Configs never name import paths.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

_BLOCKS: dict[str, type] = {}
_CHARS: dict[str, str] = {}
_loaded = False
ENTRY_POINT_GROUP = "seqlm.blocks"


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


def unregister(name: str) -> None:
    """Remove block ``name`` and its pattern char (tests that register throwaway blocks)."""
    _BLOCKS.pop(name, None)
    for c in [c for c, n in _CHARS.items() if n == name]:
        del _CHARS[c]


def load_blocks() -> None:
    """Import every module of seqlm.blocks, then every ``seqlm.blocks`` entry point, once, so
    their @register calls run."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: a plugin that imports seqlm.config must not recurse here
    import seqlm.blocks as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"seqlm.blocks.{mod.name}")
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - name the plugin, keep the cause
            raise ImportError(f"seqlm.blocks entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e


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
