"""Blocks: one file per layer type, each registered with seqlm.registry.register.

Modules here are imported automatically by seqlm.registry.load_blocks().
"""
from seqlm.blocks.base import Block, BlockConfig

__all__ = ["Block", "BlockConfig"]
