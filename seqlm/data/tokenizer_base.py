"""The tokenizer interface (see :mod:`seqlm.data.tokenizers`) and small file helpers."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT_VERSION = 1


def _as_array(ids) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode: expected a 1-D sequence of ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode: ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class Tokenizer(ABC):
    """Base class; subclasses define ``type``, ``vocab_size``, ``eos_id``, encode/decode."""

    type: str = ""
    # True when encode(a + b) == encode(a) + encode(b) whenever a ends with "\n": the
    # dataset then splits big documents at line ends to batch and show progress
    split_safe: bool = True

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D int64 array (the fast path)."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of ``ids`` (list or 1-D tensor/array); EOS is dropped."""

    @abstractmethod
    def _spec(self) -> dict:
        """JSON-able description written to tokenizer.json (without the format keys)."""

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def _check_ids(self, arr: np.ndarray) -> None:
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"decode: id {bad} is outside the {self.type} vocabulary [0, {self.vocab_size})")

    def _model_files(self) -> dict[str, bytes]:
        return {}

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps({"type": self.type, **self._spec()}, sort_keys=True).encode())
        for name, data in sorted(self._model_files().items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()

    def save(self, directory) -> Path:
        """Write ``tokenizer.json`` (+ model files) into ``directory`` (created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self._model_files().items():
            _atomic_write(d / name, data)
        spec = {"seqlm_tokenizer": FORMAT_VERSION, "type": self.type, **self._spec(),
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "fingerprint": self.fingerprint()}
        _atomic_write(d / "tokenizer.json", json.dumps(spec, indent=1).encode())
        return d

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(fd: int) -> None:
    """Give a mkstemp file (0600) the mode a plain open() would have (0666 & ~umask)."""
    os.fchmod(fd, 0o666 & ~_umask())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        public_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
