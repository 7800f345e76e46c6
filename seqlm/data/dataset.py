"""Token datasets: sources tokenized once into token caches, splits, batches and eval windows.

``load_data(cfg, tokenizer)`` reads the documents of every source (``data.files``, or the
weighted ``data.sources``), tokenizes them in parallel (:mod:`seqlm.data.pipeline`) into one
token cache per source (:mod:`seqlm.data.cache`: ids, document starts, metadata) and memory-maps
it. Each source is split into train and val: the last ``val_fraction`` of its tokens
(``val_split: tokens``) or its last whole documents holding about that fraction
(``val_split: documents``: no document is shared by the two splits).

``get_batch`` draws random windows: the source of each row by weight, then a start inside
that source's split (a window never spans two sources). With ``packing: document`` it also
returns ``seq_idx`` (B, T) int32: per row, 0 from the window's first token, +1 at the first
token of every later document (a document's EOS belongs to it). ``iter_windows`` walks a split
in order for evaluation, with ``seq_idx`` on request; ``doc_starts(split)`` gives the
document boundaries of a split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from seqlm.data.cache import file_digest, load_source, token_dtype  # noqa: F401  (re-exported)
from seqlm.data.sources import expand_files
from seqlm.data.tokenizers import Tokenizer

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class SourceData:
    """One source's tokens, document starts and split point."""

    tokens: np.ndarray  # (N,) ids
    doc_starts: np.ndarray  # (D,) int64, ascending, doc_starts[0] == 0
    n_val: int
    weight: float
    files: list[Path]
    cache_path: Path
    from_cache: bool
    meta: dict

    def bounds(self, split: str) -> tuple[int, int]:
        n = len(self.tokens)
        return (0, n - self.n_val) if split == "train" else (n - self.n_val, n)


def seq_idx_from_starts(doc_starts: np.ndarray, starts: np.ndarray, T: int) -> np.ndarray:
    """Document index of positions ``starts[b] + t`` minus that of ``starts[b]``: (B, T) int32."""
    pos = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(T)  # (B, T)
    doc = np.searchsorted(doc_starts, pos, side="right")  # (B, T): 1 + document index
    return (doc - doc[:, :1]).astype(np.int32)


def seq_idx_from_eos(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """seq_idx of token windows ``x`` (B, T) where a document ends at each EOS: (B, T) int32."""
    after = (x == eos_id).to(torch.int32).cumsum(1)  # (B, T): EOS seen up to and including t
    return torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], 1)


def split_by_documents(n: int, doc_starts: np.ndarray, frac: float, where: str) -> int:
    """n_val such that val is the last whole documents holding about ``frac`` of the tokens."""
    if len(doc_starts) < 2:
        raise ValueError(f"data.val_split: documents needs at least 2 documents in {where}, found "
                         f"{len(doc_starts)}; set data.doc_separator or use val_split: tokens")
    want = n - max(1, int(round(n * frac)))
    i = int(np.clip(np.searchsorted(doc_starts, want), 1, len(doc_starts) - 1))
    if i > 1 and abs(int(doc_starts[i - 1]) - want) <= abs(int(doc_starts[i]) - want):
        i -= 1
    return n - int(doc_starts[i])


@dataclass
class TokenData:
    """Token ids of one or more sources, each split into ``train`` and ``val``."""

    parts: list[SourceData]
    tokenizer: Tokenizer
    packing: str = "stream"
    _checked: set = field(default_factory=set, repr=False)

    # one-source views (the common case; with several sources, the splits are concatenated copies)
    @property
    def tokens(self) -> np.ndarray:
        return self.parts[0].tokens if len(self.parts) == 1 else np.concatenate([p.tokens for p in self.parts])

    @property
    def n_val(self) -> int:
        return sum(p.n_val for p in self.parts)

    @property
    def files(self) -> list[Path]:
        return [f for p in self.parts for f in p.files]

    @property
    def cache_path(self) -> Path:
        return self.parts[0].cache_path

    @property
    def from_cache(self) -> bool:
        return all(p.from_cache for p in self.parts)

    @property
    def meta(self) -> dict:
        return self.parts[0].meta if len(self.parts) == 1 else {"sources": [p.meta for p in self.parts]}

    @property
    def train(self) -> np.ndarray:
        return self.split("train")

    @property
    def val(self) -> np.ndarray:
        return self.split("val")

    def split(self, name: str) -> np.ndarray:
        _check_split(name)
        views = [p.tokens[slice(*p.bounds(name))] for p in self.parts]
        return views[0] if len(views) == 1 else np.concatenate(views)

    def doc_starts(self, split: str, source: int = 0) -> np.ndarray:
        """Document starts inside ``split`` of one source, relative to the split's first token
        (which counts as a start even inside a document): (D,) int64, ascending, first 0."""
        _check_split(split)
        p = self.parts[source]
        lo, hi = p.bounds(split)
        ds = np.asarray(p.doc_starts)
        inner = ds[(ds > lo) & (ds < hi)] - lo
        return np.concatenate([[0], inner]).astype(np.int64)

    def check_seq_len(self, seq_len: int) -> None:
        """Raise a clear error unless every split of every source holds ``seq_len + 1`` tokens."""
        if seq_len in self._checked:
            return
        for p in self.parts:
            files = [str(f) for f in p.files]
            for name, why in (("val", "raise data.val_fraction"), ("train", "lower data.val_fraction")):
                lo, hi = p.bounds(name)
                if hi - lo < seq_len + 1:
                    raise ValueError(f"data.val_fraction: the {name} split has {hi - lo} tokens, fewer than "
                                     f"seq_len + 1 = {seq_len + 1}; {why}, lower train.seq_len or add "
                                     f"text to data files {files}")
        self._checked.add(seq_len)

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, ...]:
        """Random windows: x (B, T) and y (B, T) = x shifted by one token, int64; with
        ``packing: document`` also seq_idx (B, T) int32 (see the module doc)."""
        _check_split(split)
        self.check_seq_len(seq_len)
        B, T = batch_size, seq_len
        if len(self.parts) == 1:
            src = np.zeros(B, dtype=np.int64)
            lo, hi = self.parts[0].bounds(split)
            starts = torch.randint(hi - lo - T, (B,), generator=generator,
                                   device=generator.device).cpu().numpy() + lo  # (B,)
        else:
            w = torch.tensor([p.weight for p in self.parts], dtype=torch.float64)
            src = torch.multinomial(w, B, replacement=True, generator=generator).numpy()  # (B,)
            u = torch.rand(B, dtype=torch.float64, generator=generator).numpy()  # (B,)
            room = np.array([np.subtract(*self.parts[s].bounds(split)[::-1]) - T for s in src])
            lows = np.array([self.parts[s].bounds(split)[0] for s in src])
            starts = lows + np.minimum((u * room).astype(np.int64), room - 1)
        w = np.empty((B, T + 1), dtype=np.int64)  # (B, T+1)
        seq = np.empty((B, T), dtype=np.int32) if self.packing == "document" else None
        for s in np.unique(src):
            rows = np.nonzero(src == s)[0]
            part = self.parts[s]
            w[rows] = part.tokens[starts[rows, None] + np.arange(T + 1)]
            if seq is not None:
                seq[rows] = seq_idx_from_starts(part.doc_starts, starts[rows], T)
        w_t = torch.from_numpy(w)
        x, y = _to(w_t[:, :-1].contiguous(), device), _to(w_t[:, 1:].contiguous(), device)
        return (x, y) if seq is None else (x, y, _to(torch.from_numpy(seq), device))

    def iter_windows(self, split: str, seq_len: int, stride: Optional[int] = None, batch_size: int = 1,
                     device="cpu", with_seq_idx: Optional[bool] = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Sliding windows over a split in order, for evaluation: yields x, y of shape (b, T)
        (b <= batch_size, T = min(seq_len, len - 1)), source after source (a batch never
        mixes sources). Each window starts ``stride`` (default ``seq_len``) after the previous
        one and the last ends at the split's end; targets already scored by an earlier window
        are set to -100 (cross_entropy's ignore_index), so every token after the first is
        scored exactly once, with as much context as the window has. ``with_seq_idx`` (default:
        ``packing == "document"``) adds seq_idx (b, T) int32 of each window."""
        _check_split(split)
        with_seq = self.packing == "document" if with_seq_idx is None else with_seq_idx
        for k in range(len(self.parts)):
            yield from self._windows(k, split, seq_len, stride, batch_size, device, with_seq)

    def _windows(self, k, split, seq_len, stride, batch_size, device, with_seq):
        part = self.parts[k]
        lo, hi = part.bounds(split)
        data, n = part.tokens[lo:hi], hi - lo
        if n < 2:
            raise ValueError(f"iter_windows: the {split} split has {n} tokens; need at least 2")
        T = min(seq_len, n - 1)
        stride = T if stride is None else stride
        if not 1 <= stride <= T:
            raise ValueError(f"stride: must be in [1, {T}] (the window length), got {stride}")
        ds = self.doc_starts(split, k) if with_seq else None
        xs, ys, ss = [], [], []
        start, done = 0, 0  # done: targets data[1..done] have been scored
        while done < n - 1:
            s = min(start, n - 1 - T)
            w = torch.from_numpy(data[s:s + T + 1].astype(np.int64))  # (T+1,)
            y = w[1:].clone()
            y[: max(0, done - s)] = IGNORE_INDEX  # target j is data[s+1+j]
            xs.append(w[:-1])
            ys.append(y)
            ss.append(s)
            done = s + T
            start += stride
            if len(xs) == batch_size or done >= n - 1:
                out = (_to(torch.stack(xs), device), _to(torch.stack(ys), device))
                if with_seq:
                    out += (_to(torch.from_numpy(seq_idx_from_starts(ds, np.array(ss), T)), device),)
                yield out
                xs, ys, ss = [], [], []

    def __repr__(self) -> str:
        return (f"TokenData(train={sum(np.subtract(*p.bounds('train')[::-1]) for p in self.parts):,} "
                f"val={self.n_val:,} tokens, {len(self.parts)} source(s), {self.packing} packing, "
                f"{self.tokenizer.type} vocab {self.tokenizer.vocab_size}, cache={str(self.cache_path)!r})")


def _check_split(name: str) -> None:
    if name not in ("train", "val"):
        raise ValueError(f"split: must be 'train' or 'val', got {name!r}")


def _to(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def source_specs(cfg) -> list[dict]:
    """The sources of a DataConfig: ``data.sources``, or one source of weight 1 from ``data.files``."""
    if cfg.sources:
        return [{"files": s.files, "weight": s.weight, "text_field": s.text_field or cfg.text_field,
                 "separator": s.doc_separator if s.doc_separator is not None else cfg.doc_separator,
                 "field": f"data.sources[{i}].files"} for i, s in enumerate(cfg.sources)]
    return [{"files": cfg.files, "weight": 1.0, "text_field": cfg.text_field, "separator": cfg.doc_separator,
             "field": "data.files"}]


def load_data(cfg, tokenizer: Tokenizer, seq_len: Optional[int] = None,
              progress: Optional[bool] = None) -> TokenData:
    """Tokenize the sources of ``cfg`` (a DataConfig) once into token caches and split them;
    ``seq_len`` (optional) checks up front that every split can hold a window."""
    parts = []
    for spec in source_specs(cfg):
        paths = expand_files(spec["files"], field=spec["field"])
        ids, docs, meta, hit, path = load_source(
            paths, tokenizer, spec["text_field"], spec["separator"], Path(cfg.cache_dir),
            getattr(cfg, "num_workers", None), getattr(cfg, "verify_cache", False), progress)
        n = len(ids)
        if getattr(cfg, "val_split", "tokens") == "documents":
            n_val = split_by_documents(n, np.asarray(docs), cfg.val_fraction, f"{spec['field']} {[str(p) for p in paths]}")
        else:
            n_val = min(n, max(1, int(round(n * cfg.val_fraction))))
        parts.append(SourceData(ids, docs, n_val, spec["weight"], paths, path, hit, meta))
    data = TokenData(parts, tokenizer, getattr(cfg, "packing", "stream"))
    if seq_len is not None:
        data.check_seq_len(seq_len)
    return data
