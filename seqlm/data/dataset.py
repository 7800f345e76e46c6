"""Token datasets: documents from local files, tokenized once into a memmapped token cache.

``load_data(cfg, tokenizer)`` reads every document of ``cfg.files`` (see
:mod:`seqlm.data.sources`), appends EOS after each one, and writes the ids to
``<cache_dir>/<name>-<key>.bin`` (uint16 when the vocabulary has < 65535 ids, else uint32)
with a ``.json`` beside it. The key hashes the resolved paths, sizes, mtimes and a content
hash (blake2b) of every file, the text field and the tokenizer fingerprint, so editing a
file or changing the tokenizer rebuilds the cache and anything else reuses it. Both files
are written to temp names and renamed (the ``.json`` last: it marks the cache complete).

The last ``val_fraction`` of the tokens is the validation split. ``get_batch`` draws random
windows; ``iter_windows`` walks a split in order for evaluation.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from seqlm.data.sources import expand_files, iter_documents
from seqlm.data.tokenizers import Tokenizer, public_mode

CACHE_VERSION = 1
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
PROGRESS_MIN_BYTES = 8 << 20  # show a tqdm bar when the inputs are at least this large
PIECE_CHARS = 1 << 20  # big documents are encoded in pieces of about this many characters
BATCH_CHARS = 8 << 20  # pieces are encoded in batches of about this many characters


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65535 else np.uint32)


def file_digest(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def cache_key(paths: list[Path], tokenizer: Tokenizer, text_field: str) -> str:
    files = []
    for p in paths:
        st = p.stat()
        files.append([str(p), st.st_size, st.st_mtime_ns, file_digest(p)])
    blob = {"v": CACHE_VERSION, "files": files, "text_field": text_field,
            "tokenizer": tokenizer.fingerprint(), "dtype": token_dtype(tokenizer.vocab_size).name}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _pieces(doc: str, safe: bool) -> Iterator[str]:
    """Split a big document after newlines into pieces of ~PIECE_CHARS (when safe)."""
    if not safe or len(doc) <= PIECE_CHARS:
        yield doc
        return
    start = 0
    while len(doc) - start > PIECE_CHARS:
        nl = doc.rfind("\n", start, start + PIECE_CHARS)
        if nl < 0:
            nl = doc.find("\n", start + PIECE_CHARS)
            if nl < 0:
                break
        yield doc[start:nl + 1]
        start = nl + 1
    if start < len(doc):
        yield doc[start:]


def tokenize_files(paths: list[Path], tokenizer: Tokenizer, text_field: str, out, dtype: np.dtype,
                   progress: Optional[bool] = None) -> dict:
    """Encode every document of ``paths`` (EOS after each) and write the ids to the binary
    file object ``out``; returns counts. Errors name the file and document."""
    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True,
               disable=not (progress if progress is not None else total >= PROGRESS_MIN_BYTES))
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    n_tokens = n_docs = 0
    done_bytes = 0
    for path in paths:
        batch: list[tuple[str, bool, int, int]] = []  # (text, ends a document, doc index, offset)
        chars = 0

        def flush():
            nonlocal n_tokens, chars
            try:
                encoded = tokenizer.encode_batch([b[0] for b in batch])
            except ValueError as e:  # find the piece that fails, to name the document
                for text, _, doc, off in batch:
                    try:
                        tokenizer.encode_array(text)
                    except ValueError as e2:
                        raise ValueError(f"data file {str(path)!r} (document {doc + 1}, "
                                         f"character offset {off}): {e2}") from None
                raise ValueError(f"data file {str(path)!r}: {e}") from None
            parts = []
            for (text, last, _, _), ids in zip(batch, encoded):
                parts.append(ids)
                if last:
                    parts.append(eos)
                bar.update(len(text))
            arr = np.concatenate(parts)
            out.write(arr.astype(dtype).tobytes())
            n_tokens += len(arr)
            batch.clear()
            chars = 0

        for doc_i, doc in enumerate(iter_documents(path, text_field)):
            n_docs += 1
            off = 0
            pieces = list(_pieces(doc, tokenizer.split_safe))
            for j, piece in enumerate(pieces):
                batch.append((piece, j == len(pieces) - 1, doc_i, off))
                off += len(piece)
                chars += len(piece)
                if chars >= BATCH_CHARS:
                    flush()
        if batch:
            flush()
        done_bytes += path.stat().st_size
        bar.n = done_bytes  # chars != bytes (and jsonl has markup): resync per file
        bar.refresh()
    bar.close()
    return {"n_tokens": n_tokens, "n_docs": n_docs}


@dataclass
class TokenData:
    """Token ids of a corpus split into ``train`` and ``val`` (1-D memmaps)."""

    tokens: np.ndarray
    n_val: int
    tokenizer: Tokenizer
    files: list[Path]
    cache_path: Path
    from_cache: bool
    meta: dict = field(default_factory=dict)
    _checked: set = field(default_factory=set, repr=False)

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: len(self.tokens) - self.n_val]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[len(self.tokens) - self.n_val:]

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split: must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def check_seq_len(self, seq_len: int) -> None:
        """Raise a clear error unless both splits hold at least ``seq_len + 1`` tokens."""
        if seq_len in self._checked:
            return
        files = [str(p) for p in self.files]
        for name, why in (("val", "raise data.val_fraction"), ("train", "lower data.val_fraction")):
            n = len(self.split(name))
            if n < seq_len + 1:
                raise ValueError(f"data.val_fraction: the {name} split has {n} tokens, fewer than "
                                 f"seq_len + 1 = {seq_len + 1}; {why}, lower train.seq_len or add "
                                 f"text to data.files {files}")
        self._checked.add(seq_len)

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and y (B, T) = x shifted by one token, int64."""
        self.check_seq_len(seq_len)
        data = self.split(split)
        starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator,
                               device=generator.device).cpu().numpy()  # (B,)
        idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        w = torch.from_numpy(data[idx].astype(np.int64))  # (B, T+1)
        return _to(w[:, :-1].contiguous(), device), _to(w[:, 1:].contiguous(), device)

    def iter_windows(self, split: str, seq_len: int, stride: Optional[int] = None,
                     batch_size: int = 1, device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sliding windows over a split in order, for evaluation: yields x, y of shape (b, T)
        (b <= batch_size, T = min(seq_len, len - 1)). Each window starts ``stride`` (default
        ``seq_len``) after the previous one and the last ends at the split's end; targets already
        scored by an earlier window are set to -100 (cross_entropy's ignore_index), so every
        token after the first is scored exactly once, with as much context as the window has."""
        data = self.split(split)
        n = len(data)
        if n < 2:
            raise ValueError(f"iter_windows: the {split} split has {n} tokens; need at least 2")
        T = min(seq_len, n - 1)
        stride = T if stride is None else stride
        if not 1 <= stride <= T:
            raise ValueError(f"stride: must be in [1, {T}] (the window length), got {stride}")
        xs, ys = [], []
        start, done = 0, 0  # done: targets data[1..done] have been scored
        while done < n - 1:
            s = min(start, n - 1 - T)
            w = torch.from_numpy(data[s:s + T + 1].astype(np.int64))  # (T+1,)
            y = w[1:].clone()
            y[: max(0, done - s)] = IGNORE_INDEX  # target j is data[s+1+j]
            xs.append(w[:-1])
            ys.append(y)
            done = s + T
            start += stride
            if len(xs) == batch_size:
                yield _to(torch.stack(xs), device), _to(torch.stack(ys), device)
                xs, ys = [], []
        if xs:
            yield _to(torch.stack(xs), device), _to(torch.stack(ys), device)

    def __repr__(self) -> str:
        return (f"TokenData(train={len(self.train):,} val={len(self.val):,} tokens, "
                f"{self.tokenizer.type} vocab {self.tokenizer.vocab_size}, cache={str(self.cache_path)!r})")


def _to(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def load_data(cfg, tokenizer: Tokenizer, seq_len: Optional[int] = None,
              progress: Optional[bool] = None) -> TokenData:
    """Tokenize ``cfg.files`` (a DataConfig) once into the token cache and split it;
    ``seq_len`` (optional) checks up front that both splits can hold a window."""
    paths = expand_files(cfg.files)
    key = cache_key(paths, tokenizer, cfg.text_field)
    dtype = token_dtype(tokenizer.vocab_size)
    cache_dir = Path(cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{paths[0].stem[:40]}-{tokenizer.type}-{key[:16]}"
    bin_path, meta_path = cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"
    meta = _read_meta(meta_path, bin_path, key, dtype)
    from_cache = meta is not None
    if meta is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.bin.tmp-", dir=cache_dir)
        try:
            public_mode(fd)
            with os.fdopen(fd, "wb") as f:
                counts = tokenize_files(paths, tokenizer, cfg.text_field, f, dtype, progress)
            os.replace(tmp, bin_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        meta = {"key": key, "dtype": dtype.name, **counts, "files": [str(p) for p in paths],
                "text_field": cfg.text_field, "tokenizer_type": tokenizer.type,
                "tokenizer_fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.json.tmp-", dir=cache_dir)
        public_mode(fd)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, meta_path)
    n = meta["n_tokens"]
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))
    n_val = min(n, max(1, int(round(n * cfg.val_fraction))))
    data = TokenData(tokens, n_val, tokenizer, paths, bin_path, from_cache, meta)
    if seq_len is not None:
        data.check_seq_len(seq_len)
    return data


def _read_meta(meta_path: Path, bin_path: Path, key: str, dtype: np.dtype) -> Optional[dict]:
    """The cache's metadata when the cache is complete and matches ``key``, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta.get("key") == key and meta.get("dtype") == dtype.name and
              bin_path.stat().st_size == meta["n_tokens"] * dtype.itemsize and meta["n_tokens"] > 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None
