"""Synthetic task data sources for ``seqlm train`` (``data.task``), e.g. MQAR (Zoology):
the loop draws (inputs, labels) batches from pre-generated examples instead of a text corpus;
labels are -100 except at the positions the task scores, so the training loss is the task's.

    data:
      task: {type: mqar, num_pairs: 4, vocab_size: 8192}   # L = train.seq_len
    seqlm train -c mqar.yaml && seqlm eval mqar --checkpoint runs/mqar/checkpoint --settings 64,4

The tokenizer of a task run is :class:`IdTokenizer` (ids are their own text), saved with the
checkpoint like any other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seqlm.data.mqar import MQARSpec, make_mqar
from seqlm.data.tokenizer_base import Tokenizer, _as_array


class IdTokenizer(Tokenizer):
    """Token ids as text ("12 7 4093"); vocabulary [0, V); id 0 doubles as EOS (MQAR's pad)."""

    type = "ids"

    def __init__(self, vocab_size: int):
        self._V = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._V

    @property
    def eos_id(self) -> int:
        return 0

    def encode_array(self, text: str) -> np.ndarray:
        try:
            arr = np.array([int(t) for t in text.split()], dtype=np.int64)
        except ValueError:
            raise ValueError(f"ids tokenizer: text must be whitespace-separated integer ids, got {text[:40]!r}") from None
        self._check_ids(arr)
        return arr

    def decode(self, ids) -> str:
        arr = _as_array(ids)
        self._check_ids(arr)
        return " ".join(str(int(i)) for i in arr)

    def _spec(self) -> dict:
        return {"vocab_size": self._V}


@dataclass
class TaskData:
    """Pre-generated examples per split: inputs and labels (n, L) int64."""

    splits: dict
    seq_len: int
    tokenizer: Tokenizer

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Random examples: x (B, L) and y (B, L) (the labels; -100 where nothing is scored)."""
        if split not in self.splits:
            raise ValueError(f"split: must be one of {sorted(self.splits)}, got {split!r}")
        if seq_len != self.seq_len:
            raise ValueError(f"train.seq_len: the task's examples have length {self.seq_len}, got {seq_len}")
        x, y = self.splits[split]
        idx = torch.randint(x.shape[0], (batch_size,), generator=generator, device=generator.device).cpu()
        return x[idx].to(device), y[idx].to(device)

    def __repr__(self) -> str:
        return f"TaskData({', '.join(f'{k}={v[0].shape[0]:,}' for k, v in self.splits.items())} examples of {self.seq_len})"


def load_task(cfg, seq_len: int) -> tuple[Tokenizer, TaskData]:
    """The tokenizer and data of a ``data.task`` config for windows of ``seq_len`` tokens."""
    if cfg.type == "mqar":
        spec = MQARSpec(seq_len, cfg.num_pairs, cfg.vocab_size, random_fill=cfg.random_fill)
        try:
            spec.check()
        except ValueError as e:  # name the config fields
            raise ValueError(f"data.task ({e}; L = train.seq_len = {seq_len})") from None
        splits = {"train": make_mqar(cfg.n_train, spec, seed=cfg.seed),
                  "val": make_mqar(cfg.n_val, spec, seed=cfg.seed + 10_000)}
        return IdTokenizer(cfg.vocab_size), TaskData(splits, seq_len, IdTokenizer(cfg.vocab_size))
    raise ValueError(f"data.task.type: unknown task {cfg.type!r}")
