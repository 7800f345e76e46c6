"""Relaxed Recursive Transformers (Bae et al.): shared blocks + per-depth LoRA, and the SVD
conversion of an unshared checkpoint (``seqlm convert recursive``).

The stack keeps K shared blocks and one :class:`DepthParams` per layer (depth). Block code is
never copied or edited: what a depth owns is swapped into the shared block's parameter slots
for the duration of that depth's call (:func:`use_depth`):

- every ``nn.Linear`` weight W' is shared by the layers l = k, k + K, k + 2K, ...; with
  ``lora_rank`` r > 0, depth l sees W' + (alpha / r) B_l A_l (B_l: (out, r), A_l: (r, in),
  r capped at min(in, out)). While gradients are on, a plain ``nn.Linear`` runs as
  :class:`DepthLinear` for the depth's call: ``linear(x)`` applies the delta in the cheaper
  exact form for its input (:func:`lora_linear`: the factors to x when
  N (in + out) < in out for N input rows, i.e. decode-sized batches; the merged matrix
  otherwise, training sizes), and a direct ``linear.weight`` read (Mamba-1 splits in_proj,
  uses dt_proj.weight) gets the merged matrix, built at most once per call. Other Linear
  classes (tensor-parallel ones) get the merged matrix in their slot. In ``no_grad``
  (generation) the merged weights are cached until a parameter changes, so they are merged.
  r = 0 is pure tying: the shared block's weight is the one tensor every depth reads.
- every other parameter of the block (Linear biases, conv weights, A_log, D, dt bias, inner
  norms, H3's SSM parameters) is a per-depth copy: they are small (vectors, or d_conv-wide
  convs), and owning them makes the full-rank conversion exact. The pre-norms are per depth
  too (the stack's ``norms``), as in the paper's cheap variant.

Conversion (:func:`seqlm.io.convert.convert_recursive`): W' = mean of the tied layers' weights (``init: average``)
or the first of them (``first``); B_l A_l = truncated SVD of W_l - W' (computed in fp64);
per-depth parameters and everything outside the stack are copied. At full rank the converted
model computes the original function (tests/test_recursive.py).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from seqlm.blocks.plan import lora_specs
from seqlm.config import RecursiveConfig


def _key(path: str) -> str:
    """Parameter path inside a block -> a legal attribute name of DepthParams."""
    return path.replace(".", "__")


def linear_paths(block: nn.Module) -> list[str]:
    """Paths of the block's nn.Linear submodules (their weights are what gets shared)."""
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def own_paths(block: nn.Module) -> list[str]:
    """Paths of the block's parameters that are not Linear weights (kept per depth)."""
    shared = {f"{p}.weight" for p in linear_paths(block)}
    return [n for n, _ in block.named_parameters() if n not in shared]


def lora_rank_of(lin: nn.Linear, rank: int) -> int:
    return min(rank, lin.in_features, lin.out_features)


class DepthParams(nn.Module):
    """What one depth owns: copies of the block's non-Linear parameters and LoRA A/B per shared
    Linear. Attribute names are the block paths with '.' -> '__' (``norm__weight``,
    ``in_proj__lora_A``)."""

    def __init__(self, block: nn.Module, rc: RecursiveConfig):
        super().__init__()
        self.rank, self.scale = rc.lora_rank, 0.0
        self.own = own_paths(block)
        params = dict(block.named_parameters())
        for p in self.own:
            self.register_parameter(_key(p), nn.Parameter(params[p].detach().clone()))
        # the copies keep the block's weight-decay exemptions (seqlm/train/optim.py)
        self.no_weight_decay = tuple(_key(p) for p in self.own if p in getattr(block, "no_weight_decay", ()))
        self.lora: list[tuple[str, int]] = []  # (linear path, rank)
        for lp in linear_paths(block) if rc.lora_rank > 0 else []:
            lin = block.get_submodule(lp)
            r = lora_rank_of(lin, rc.lora_rank)
            self.lora.append((lp, r))
            a = torch.empty(r, lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
            nn.init.normal_(a, 0.0, 1.0 / math.sqrt(lin.in_features))
            self.register_parameter(_key(lp) + "__lora_A", nn.Parameter(a))
            self.register_parameter(_key(lp) + "__lora_B", nn.Parameter(
                torch.zeros(lin.out_features, r, dtype=lin.weight.dtype, device=lin.weight.device)))
        if rc.lora_rank > 0:
            self.scale = (rc.lora_alpha or rc.lora_rank) / rc.lora_rank
        self._cache: dict = {}

    def lora_AB(self, lp: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, _key(lp) + "__lora_A"), getattr(self, _key(lp) + "__lora_B")

    def merged(self, lp: str, w: torch.Tensor) -> torch.Tensor:
        """W' + scale * B A (cached while gradients are off and nothing changed)."""
        A, B = self.lora_AB(lp)
        if torch.is_grad_enabled():
            return torch.addmm(w, B, A, alpha=self.scale)
        tag = (w._version, A._version, B._version, w.data_ptr(), A.data_ptr(), B.data_ptr(), w.dtype)
        hit = self._cache.get(lp)
        if hit is None or hit[0] != tag:
            hit = (tag, torch.addmm(w, B, A, alpha=self.scale))
            self._cache[lp] = hit
        return hit[1]

    def tp_plan(self, block_plan: dict, prefix: str) -> dict:
        """Plan entries for this depth's parameters: own copies take the block's spec; LoRA
        follows its base (plan.lora_specs: a column base cuts B's rows, a row base A's
        columns; the other factor is replicated with summed gradients)."""
        def kind(path):
            hits = [v for k, v in block_plan.items() if re.fullmatch(k, path)]
            return hits[0] if hits else None

        plan = {}
        for p in self.own:
            if kind(p) is not None:
                plan[prefix + re.escape(_key(p))] = kind(p)
        for lp, _ in self.lora:
            a, b = lora_specs(kind(f"{lp}.weight") or "replicate")
            plan[prefix + re.escape(_key(lp) + "__lora_A")] = a
            plan[prefix + re.escape(_key(lp) + "__lora_B")] = b
        return plan


# False: every depth's Linears get the merged W' + s B A in their weight slot (the reference
# the tests compare DepthLinear against).
DISPATCH = True


def factored_is_cheaper(rows: int, in_features: int, out_features: int) -> bool:
    """Whether ``x W'^T + s (x A^T) B^T`` costs fewer multiply-adds than merging: the factors
    cost rows * r * (in + out) more than x W'^T, merging costs in * out * r (forward; backward
    both double), so the factors win when rows * (in + out) < in * out."""
    return rows * (in_features + out_features) < in_features * out_features


def lora_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                B: torch.Tensor, scale: float, merged: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., in) -> x (W' + scale B A)^T + bias, W' ``w`` (out, in), A (r, in), B (out, r),
    in the cheaper of the two exact forms (:func:`factored_is_cheaper`); ``merged``: the merged
    matrix when it is already built (then it is used)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if merged is None and factored_is_cheaper(rows, w.shape[1], w.shape[0]):
        x2 = x.reshape(rows, x.shape[-1])
        y = torch.addmm(F.linear(x2, w, bias), F.linear(x2, A), B.t(), alpha=scale)  # (rows, out)
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, torch.addmm(w, B, A, alpha=scale) if merged is None else merged, bias)


class DepthLinear(nn.Linear):
    """An ``nn.Linear`` while it runs as one depth (``use_depth`` swaps the class in and back,
    as tensor parallelism does for its row-parallel Linears): its weight slot keeps the shared
    W'; ``forward`` goes through :func:`lora_linear`, and ``.weight`` read directly is the
    merged W' + s B A (built once per depth call)."""

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        ctx = self.__dict__["_seqlm_depth"]
        if ctx["merged"] is None:
            A, B = ctx["AB"]
            ctx["merged"] = torch.addmm(self._parameters["weight"], B, A, alpha=ctx["scale"])
        return ctx["merged"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.__dict__["_seqlm_depth"]
        A, B = ctx["AB"]
        return lora_linear(x, self._parameters["weight"], self.bias, A, B, ctx["scale"], ctx["merged"])


def strip_own(block: nn.Module) -> None:
    """Leave only the Linear weights in a shared block; the other slots are filled per depth."""
    for p in own_paths(block):
        mod_path, _, name = p.rpartition(".")
        mod = block.get_submodule(mod_path) if mod_path else block
        mod._parameters[name] = None


@contextlib.contextmanager
def use_depth(block: nn.Module, depth: DepthParams):
    """Run ``block`` as depth ``depth``: its parameter slots hold that depth's tensors."""
    saved, swapped = [], []
    try:
        for p in depth.own:
            mod_path, _, name = p.rpartition(".")
            mod = block.get_submodule(mod_path) if mod_path else block
            saved.append((mod, name, mod._parameters[name]))
            mod._parameters[name] = getattr(depth, _key(p))
        for lp, _ in depth.lora:
            mod = block.get_submodule(lp)
            if DISPATCH and type(mod) is nn.Linear and torch.is_grad_enabled():
                mod.__dict__["_seqlm_depth"] = {"AB": depth.lora_AB(lp), "scale": depth.scale, "merged": None}
                mod.__class__ = DepthLinear
                swapped.append(mod)
                continue
            w = mod._parameters["weight"]
            saved.append((mod, "weight", w))
            mod._parameters["weight"] = depth.merged(lp, w)
        yield block
    finally:
        for mod in swapped:
            mod.__class__ = nn.Linear
            del mod.__dict__["_seqlm_depth"]
        for mod, name, t in reversed(saved):
            mod._parameters[name] = t


def share_blocks(blocks: list[nn.Module], rc: RecursiveConfig):
    """Unshared blocks (one per layer, already initialised) -> (K shared blocks, per-depth params).
    Depth l keeps block l's own parameters; the shared Linear weights are block k's (k < K)."""
    K = rc.groups
    depths = nn.ModuleList(DepthParams(b, rc) for b in blocks)
    shared = nn.ModuleList(blocks[:K])
    for b in shared:
        strip_own(b)
    return shared, depths


# --------------------------------------------------------------------------------------
# conversion


@torch.no_grad()
def fill_from_unshared(stack, old_blocks: list[nn.Module], init: str = "average") -> None:
    """Set a recursive stack's shared weights and per-depth parameters from unshared blocks:
    W' = average (or first) of the tied weights, B_l A_l = truncated SVD of W_l - W' (fp64)."""
    K, n = stack.groups, len(old_blocks)
    for k in range(K):
        shared = stack.blocks[k]
        tied = list(range(k, n, K))
        for lp in linear_paths(shared):
            lin = shared.get_submodule(lp)
            ws = [old_blocks[l].get_submodule(lp).weight.double() for l in tied]
            wp = torch.stack(ws).mean(0) if init == "average" else ws[0]
            lin.weight.copy_(wp)
            for l, w in zip(tied, ws):
                d = stack.depths[l]
                if not d.lora:
                    continue
                A, B = d.lora_AB(lp)
                r = A.shape[0]
                U, S, Vh = torch.linalg.svd(w - wp, full_matrices=False)
                s = (S[:r] / d.scale).sqrt()
                B.copy_(U[:, :r] * s)
                A.copy_(s[:, None] * Vh[:r])
    for l, old in enumerate(old_blocks):
        params = dict(old.named_parameters())
        for p in stack.depths[l].own:
            getattr(stack.depths[l], _key(p)).copy_(params[p])
