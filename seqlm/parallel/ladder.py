"""Ladder-residual all-reduce overlap (Zhang et al.): under TP, sub-layer i's row-parallel
all-reduce is issued asynchronously and waited one sub-layer later, while sub-layer i+1
computes (the ladder stack reads out_i only after f_{i+1} has run, seqlm/stack.py).

How it hooks in, from outside the stack and the blocks: each block's ``out_proj`` (a
:class:`~seqlm.parallel.tp.RowParallelLinear`) gets a shared :class:`Overlap`; inside a
block's forward it launches its all-reduce with ``async_op=True`` and returns the buffer
the collective writes into. The *next* block's forward-post hook waits for it (before the
stack adds it to the stream); the last layer of a pass waits for its own. The backward is
unchanged (identity for the row-parallel output). Used only without output bias and
dropout (both would read the buffer early); otherwise the all-reduce stays synchronous.
``Overlap.exposed_s`` / ``launched`` record the time spent blocked in waits, for
bench/distributed.py.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class _AsyncReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, overlap):
        buf = y.contiguous().clone()
        overlap.pending.append(dist.all_reduce(buf, group=group, async_op=True))
        return buf

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class Overlap:
    """Pending all-reduces of one ladder stack and the bookkeeping around them."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.pending: list = []
        self.active = False    # inside a block's forward (not a decode step)
        self.before = 0        # pending count when the current block started
        self.calls = 0         # block forwards so far: position in the pass = calls % n_layers
        self.exposed_s = 0.0   # time blocked in wait()
        self.launched = 0

    def reduce(self, y, group):
        self.launched += 1
        return _AsyncReduceFrom.apply(y, group, self)

    def _wait(self, handles):
        t = time.perf_counter()
        for w in handles:
            w.wait()
        self.exposed_s += time.perf_counter() - t

    def pre(self, mod, args, kwargs):
        # not inside a backward pass: activation checkpointing's recompute stays synchronous
        self.active = torch._C._current_graph_task_id() == -1
        self.before = len(self.pending)

    def post(self, mod, args, kwargs, out):
        if not self.active:
            return out
        self.active = False
        self.calls += 1
        # the previous sub-layer's all-reduce ran while this one computed; the stack adds it
        # to the stream right after this returns. The pass's last layer waits for its own.
        old, new = self.pending[:self.before], self.pending[self.before:]
        last = self.calls % self.n_layers == 0
        self._wait(old + new if last else old)
        self.pending = [] if last else new
        return out

    def reset_stats(self):
        self.exposed_s, self.launched = 0.0, 0
