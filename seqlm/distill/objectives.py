"""The three MOHAWK stage losses as objectives for the training loop (seqlm.train.loop.train's
``objective``): each freezes what its stage does not train in ``setup`` and computes the loss
from (student, batch) in ``loss``. The teacher runs under no_grad in eval mode.

- :class:`Orient` (stage 1): per paired layer i, the student mixer fed the teacher's residual
  stream entering layer i (through the student's norm i) is fit so its materialised mixing
  matrix matches the teacher's attention matrix; Frobenius distance averaged over batch and
  heads, then over layers (the layers' parameters are disjoint: they train independently).
- :class:`Align` (stage 2): per paired layer, the student block's output on that same input
  fits the teacher block's output; L2 distance per token, averaged.
- :class:`Logits` (stage 3): T^2 KL(teacher_T || student_T) * kl_weight + CE * ce_weight.
"""
from __future__ import annotations

import re
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from seqlm.distill.mixers import LayerTrace, mixing_matrix, orientation_loss


def trainable_names(model: nn.Module, spec: Union[str, list[str]], pairs: list[int]) -> list[str]:
    """Parameter names a stage trains: ``mixers`` (the paired layers), ``all`` or regexes."""
    names = [n for n, _ in model.named_parameters()]
    if spec == "all":
        return names
    if spec == "mixers":
        pre = tuple(f"stack.blocks.{i}." for i in pairs)
        return [n for n in names if n.startswith(pre)] if pre else []
    pats = [re.compile(p) for p in spec]
    return [n for n in names if any(p.search(n) for p in pats)]


class _Objective:
    """Holds the teacher; freezes the student's parameters outside the stage's trainable set.
    ``tensor_parallel``: whether the loss is right on a tensor-parallel (sharded) student."""

    tensor_parallel = False  # orient/align read per-head matrices and block outputs of whole layers

    def __init__(self, teacher: nn.Module, pairs: list[int], trainable, teacher_dtype: Optional[torch.dtype] = None):
        self.teacher, self.pairs, self.trainable, self.teacher_dtype = teacher, list(pairs), trainable, teacher_dtype

    def setup(self, model: nn.Module, device) -> None:
        keep = set(trainable_names(model, self.trainable, self.pairs))
        if not keep:
            raise ValueError(f"distill.stages: trainable={self.trainable!r} selects no parameter of the student")
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        dtype = self.teacher_dtype or next(model.parameters()).dtype
        self.teacher.to(device=device, dtype=dtype).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _no_packing(seq_idx) -> None:
        if seq_idx is not None:
            raise ValueError("distill: document packing (seq_idx) is not supported by the distillation "
                             "objectives yet; use the default stream packing")

    def _trace(self, x, probs: bool) -> LayerTrace:
        with torch.no_grad(), LayerTrace(self.teacher, probs=probs) as tr:
            self.teacher(x)
        return tr


class Orient(_Objective):
    def setup(self, model: nn.Module, device) -> None:
        super().setup(model, device)
        # A paired mixer's parameters that its matrix never reads (out_proj, the gate's norm) get no
        # gradient here. One process's AdamW skips them; DeepSpeed hands every trainable parameter a
        # zero gradient (and so AdamW's weight decay): frozen, both leave them exactly as they are.
        # Which ones is structural: one autograd pass on a 2-token input (no RNG drawn).
        stack = getattr(model, "_orig_mod", model).stack
        for i in self.pairs:
            _, blk, ctx = stack.layer(i)
            ps = [p for p in blk.parameters() if p.requires_grad]
            if not ps:
                continue
            u = torch.zeros(1, 2, blk.d_model, device=ps[0].device, dtype=ps[0].dtype)
            with torch.enable_grad(), ctx:
                M = mixing_matrix(blk, u)                                  # (1, H, 2, 2)
            for p, g in zip(ps, torch.autograd.grad(M.float().sum(), ps, allow_unused=True)):
                if g is None:
                    p.requires_grad_(False)

    def loss(self, model, x, y, seq_idx=None):
        self._no_packing(seq_idx)
        tr = self._trace(x, probs=True)
        stack = getattr(model, "_orig_mod", model).stack
        losses = []
        for i in self.pairs:
            norm, blk, ctx = stack.layer(i)
            with ctx:
                M = mixing_matrix(blk, norm(tr.residual[i]))              # (B, H, L, L)
            losses.append(orientation_loss(M, tr.probs[i]))
        return torch.stack(losses).mean()


class Align(_Objective):
    def loss(self, model, x, y, seq_idx=None):
        self._no_packing(seq_idx)
        tr = self._trace(x, probs=False)
        stack = getattr(model, "_orig_mod", model).stack
        losses = []
        for i in self.pairs:
            norm, blk, ctx = stack.layer(i)
            with ctx:
                out, _ = blk(norm(tr.residual[i]))                        # (B, L, D)
            losses.append((out.float() - tr.block_out[i].float()).norm(dim=-1).mean())
        return torch.stack(losses).mean()


class Logits(_Objective):
    tensor_parallel = True  # reads only the model's (full) logits: runs sharded at any distributed.tp_size

    def __init__(self, teacher, pairs, trainable, teacher_dtype=None, temperature: float = 1.0,
                 kl_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__(teacher, pairs, trainable, teacher_dtype)
        self.T, self.kl_w, self.ce_w = temperature, kl_weight, ce_weight

    def loss(self, model, x, y, seq_idx=None):
        self._no_packing(seq_idx)
        logits, _ = model(x)
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.kl_w:
            with torch.no_grad():
                t_logits, _ = self.teacher(x)
            loss = loss + self.kl_w * kd_loss(logits, t_logits.float(), self.T)
        if self.ce_w:
            loss = loss + self.ce_w * F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        return loss


def kd_loss(student_logits, teacher_logits, T: float = 1.0):
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over tokens. (..., V) logits."""
    V = student_logits.shape[-1]
    if teacher_logits.shape[-1] != V:
        raise ValueError(f"distillation: teacher vocab {teacher_logits.shape[-1]} != student vocab {V}")
    s = F.log_softmax(student_logits.reshape(-1, V) / T, -1)
    t = F.log_softmax(teacher_logits.reshape(-1, V) / T, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * T * T


OBJECTIVES = {"orient": Orient, "align": Align, "logits": Logits}
