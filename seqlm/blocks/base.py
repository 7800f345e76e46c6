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


class BlockConfig(BaseModel):
    """Base of every block's config. Subclasses add ``type: Literal["name"] = "name"``."""

    model_config = ConfigDict(extra="forbid")

    def check(self, d_model: int) -> list[tuple[str, str]]:
        """Checks that need the model width: a list of (field, reason); empty when valid."""
        return []


State = Any  # dict[str, Tensor] | None


class Block(nn.Module):
    Config: ClassVar[type[BlockConfig]]
    name: ClassVar[str]  # set by @register
    #: names of Linear submodules that write into the residual stream; they get the
    #: GPT-2 style scaled init std / sqrt(2 * n_layers)
    residual_out: ClassVar[tuple[str, ...]] = ("out_proj",)

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

    def tp_plan(self) -> dict[str, str]:
        """Parameter-name regex -> "column" (shard dim 0) | "row" (shard dim 1) | "replicate".

        Must cover every 2-D weight of the block (checked by the registry-wide test).
        """
        return {}

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
