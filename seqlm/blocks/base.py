"""The one interface every layer speaks (see DESIGN.md).

A block is a token mixer or channel mixer ``f``; the stack owns the norm and the residual
(``r = r + f(norm(r))``), so topologies such as ladder residual or recursive sharing never
touch block code.

State contract:
- ``forward(x, None)`` runs stateless (training) and returns ``(y, None)``.
- ``forward(x, state)`` continues from ``state`` (from ``init_state`` or an earlier call) and
  returns ``(y, new_state)``; this is chunked prefill / streaming.
- ``forward(x, state, seq_idx)``: ``seq_idx`` (B, L) int marks the documents packed in the
  window (seqlm/ops/docs.py); no information may cross a boundary (attention masks, SSMs
  reset their conv and recurrent state). None: one stream.
- ``step(x_t, state)`` is one token, ``x_t: (B, 1, D)``; O(1) in the context for SSMs.
States are dicts of tensors owned by the caller; blocks may update their buffers in place,
so keep a state only as long as you keep stepping it.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from seqlm.blocks.plan import Spec


class BlockConfig(BaseModel):
    """Base of every block's config. Subclasses add ``type: Literal["name"] = "name"``."""

    model_config = ConfigDict(extra="forbid")

    def check(self, d_model: int) -> list[tuple[str, str]]:
        """Checks that need the model width: a list of (field, reason); empty when valid."""
        return []

    def tp_check(self, d_model: int, tp: int) -> list[tuple[str, str]]:
        """Checks that the block shards over ``tp`` tensor-parallel ranks: (field, reason)s."""
        return []


State = Any  # dict[str, Tensor] | None


class Block(nn.Module):
    Config: ClassVar[type[BlockConfig]]
    name: ClassVar[str]  # set by @register
    #: names of Linear submodules that write into the residual stream; they get the
    #: GPT-2 style scaled init std / sqrt(2 * n_layers)
    residual_out: ClassVar[tuple[str, ...]] = ("out_proj",)
    #: names (paths inside the block) of parameters trained without weight decay whatever
    #: their shape: a block's SSM parameters (A, dt, D, ...), as the papers' reference code
    #: trains them. The optimizer (seqlm/train/optim.py) reads this; 1-D parameters (norms,
    #: biases) never decay anyway.
    no_weight_decay: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: BlockConfig, d_model: int):
        super().__init__()
        problems = cfg.check(d_model)  # also for blocks built directly, not through a RunConfig
        if problems:
            raise ValueError("; ".join(f"{f}: {why}" for f, why in problems))
        self.cfg = cfg
        self.d_model = d_model

    # -- the interface -------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: State = None,
                seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device=None, dtype=None) -> State:
        """A fresh state for ``batch`` sequences of up to ``max_len`` tokens (None: stateless)."""
        return None

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x_t`` (B, 1, D). Default: forward over one token."""
        return self.forward(x_t, state)

    def tp_plan(self, tp: int = 1) -> dict[str, Spec]:
        """Parameter-name regex -> how it shards over ``tp`` ranks (seqlm/blocks/plan.py:
        "column" | "row" | "replicate" | Split(dim, parts) | Replicate(grad_sum)).

        Must cover every parameter of the block (checked by the registry-wide test).
        """
        return {}

    def tp_local(self, tp: int) -> dict[str, int]:
        """Attributes whose values are per-rank sizes once sharded over ``tp`` ranks (heads,
        inner width): seqlm/parallel sets them, so the same forward runs on the shards."""
        return {}

    def tp_reduce(self, tp: int) -> dict[str, str]:
        """Submodules whose outputs are partial sums over the TP ranks, by path:
        "row": a row-parallel Linear whose output enters replicated compute (all-reduce
        forward, identity backward); "row_grad": one whose output feeds sharded compute
        again (all-reduce forward and backward); "norm": a gated RMSNorm whose groups span
        ranks (its statistics are all-reduced)."""
        return {name: "row" for name in self.residual_out}

    # -- initialisation ------------------------------------------------------------
    def init_weights(self, n_layers: int = 1, std: float = 0.02) -> None:
        """Normal(0, std) Linear weights, zero biases; residual outputs std/sqrt(2 n_layers).

        Blocks with special parameters (A_log, dt bias, ...) extend this.
        """
        out_std = std / math.sqrt(2 * max(1, n_layers))
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                s = out_std if name.split(".")[-1] in self.residual_out else std
                nn.init.normal_(mod.weight, 0.0, s)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
