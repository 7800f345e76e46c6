"""HMT's own parameters and its memory recall attention; initialising a model from a
stage-1 (or plain LM) checkpoint.

Parameters (all under ``memory.`` in the state dict):
- ``initial`` (n_mem, D): the memory read by the first segment (both stages);
- stage 2 only: ``recall_token`` (n_mem, D), the learnable token of the query pass, and the
  query/key projections ``w_q``, ``w_k`` (D -> recall_dim, no bias).

Recall (He et al., eq. for memory search), per memory slot i of n_mem:
    P_i = softmax((W_q q_i) (W_k M_{:, i})^T / sqrt(d_k)) · M_{:, i}
over the cache M of the last N memory embeddings (values are the memories themselves).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class HMTMemory(nn.Module):
    def __init__(self, d_model: int, mcfg, init_std: float = 0.02):
        super().__init__()
        nm = mcfg.n_memory
        self.initial = nn.Parameter(torch.randn(nm, d_model) * init_std)  # (n_mem, D)
        self.has_recall = bool(mcfg.recall)
        if self.has_recall:
            dk = mcfg.recall_dim or d_model
            self.recall_token = nn.Parameter(torch.randn(nm, d_model) * init_std)  # (n_mem, D)
            self.w_q = nn.Linear(d_model, dk, bias=False)
            self.w_k = nn.Linear(d_model, dk, bias=False)
            # unit-variance projections of the unit-RMS (final-normed) hidden states: O(1) scores
            nn.init.normal_(self.w_q.weight, 0.0, d_model ** -0.5)
            nn.init.normal_(self.w_k.weight, 0.0, d_model ** -0.5)

    def initial_memory(self, batch: int) -> torch.Tensor:
        return self.initial.unsqueeze(0).expand(batch, -1, -1)  # (B, n_mem, D)

    def query_tokens(self, batch: int) -> torch.Tensor:
        return self.recall_token.unsqueeze(0).expand(batch, -1, -1)  # (B, n_mem, D)

    def recall(self, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """q (B, n_mem, D), cache (B, N, n_mem, D) -> recalled memory (B, n_mem, D)."""
        qp = self.w_q(q)  # (B, m, dk)
        kp = self.w_k(cache)  # (B, N, m, dk)
        scores = torch.einsum("bmk,bnmk->bmn", qp, kp) / math.sqrt(qp.shape[-1])  # (B, m, N)
        probs = torch.softmax(scores.float(), dim=-1).to(cache.dtype)
        return torch.einsum("bmn,bnmd->bmd", probs, cache)


def recall_ref(mem: HMTMemory, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """The obvious loop version of :meth:`HMTMemory.recall` (tests only)."""
    B, N, m, D = cache.shape
    out = torch.zeros(B, m, D, dtype=cache.dtype, device=cache.device)
    for b in range(B):
        for i in range(m):
            qv = mem.w_q.weight @ q[b, i]  # (dk,)
            s = torch.stack([qv @ (mem.w_k.weight @ cache[b, n, i]) for n in range(N)])
            p = torch.softmax(s / math.sqrt(qv.numel()), dim=0)
            out[b, i] = sum(p[n] * cache[b, n, i] for n in range(N))
    return out
