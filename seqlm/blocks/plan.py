"""Tensor-parallel plans: how each parameter of a block shards across the ranks of a TP group.

A block's ``tp_plan(tp)`` maps parameter-name regexes to a spec. seqlm/parallel reads the
plans and shards a built model from outside; block code stays single-device.

Specs:
- ``Split(dim, parts)``: the parameter is cut along ``dim`` (0: output rows, "column
  parallel"; 1: input columns, "row parallel"). ``parts`` lists the fused sub-parts along
  that dim in order (Mamba-2's in_proj rows are [z | x | B | C | dt]); each part is cut on
  its own, in whole ``unit``s (a head's rows), so rank r holds the r-th slice of *every*
  part, concatenated in the same order. A part with ``unit=0`` is not cut: every rank holds
  all of it and its gradient (a partial sum on each rank) is all-reduced over the group.
  1-D per-channel parameters (conv bias, A_log, D, dt bias, norm weights) are ``Split(0)``
  with the same parts as the channels they follow.
- ``Replicate(grad_sum)``: every rank holds the whole parameter. ``grad_sum=False``: its
  gradient is already identical on every rank (it only sees replicated activations: norms,
  embeddings, the row-parallel output bias). ``grad_sum=True``: each rank's gradient is a
  partial sum (it feeds sharded compute) and is all-reduced over the group.
- The strings ``"column"``, ``"row"``, ``"replicate"`` are shorthands for ``Split(0)``,
  ``Split(1)`` and ``Replicate()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Part:
    size: int       # length of this sub-part along the split dim
    unit: int = 1   # cut only in whole units of this length (a head); 0: replicated part


@dataclass(frozen=True)
class Split:
    dim: int
    parts: tuple[Part, ...] = ()


@dataclass(frozen=True)
class Replicate:
    grad_sum: bool = False


Spec = Union[str, Split, Replicate]
SHORT = {"column": Split(0), "row": Split(1), "replicate": Replicate()}


def as_spec(spec: Spec) -> Union[Split, Replicate]:
    if isinstance(spec, str):
        if spec not in SHORT:
            raise ValueError(f"unknown tp_plan kind {spec!r} (column | row | replicate)")
        return SHORT[spec]
    return spec


def parts_of(spec: Split, length: int) -> tuple[Part, ...]:
    """The spec's parts, or one unit-1 part spanning ``length``; checks the sizes add up."""
    parts = spec.parts or (Part(length),)
    if sum(p.size for p in parts) != length:
        raise ValueError(f"tp_plan parts {[p.size for p in parts]} do not add up to {length}")
    return parts


def local_ranges(spec: Split, length: int, tp: int, rank: int) -> list[tuple[int, int, bool]]:
    """(start, stop, replicated) index ranges along ``spec.dim`` that rank ``rank`` holds, in
    order; ``replicated`` marks parts every rank holds whole (their gradients are summed)."""
    out, off = [], 0
    for p in parts_of(spec, length):
        if p.unit == 0:
            out.append((off, off + p.size, True))
        else:
            if p.size % (p.unit * tp):
                raise ValueError(f"a part of {p.size} in units of {p.unit} does not split over {tp} ranks")
            n = p.size // tp
            out.append((off + rank * n, off + (rank + 1) * n, False))
        off += p.size
    return out


def lora_specs(base: Spec) -> tuple[Spec, Spec]:
    """Specs of LoRA's A (r, in) and B (out, r) for a Linear weight (out, in) sharded by
    ``base``: a column base cuts B's rows like its own (A is replicated, its gradient a
    partial sum); a row base cuts A's columns (B is replicated with summed gradients)."""
    b = as_spec(base)
    if isinstance(b, Replicate):
        return b, b
    if b.dim == 0:
        return Replicate(grad_sum=True), b
    return b, Replicate(grad_sum=True)
