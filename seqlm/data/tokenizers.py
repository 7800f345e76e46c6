"""Tokenizers behind one interface: char-level, byte-level and SentencePiece (BPE / unigram).

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id``, ``type``, ``save(directory)`` (a ``tokenizer.json`` plus any model file, read back
by :func:`load_tokenizer`) and ``fingerprint()`` (a sha256 of the vocabulary / model, used as
a data-cache key and to detect a tokenizer that does not match a checkpoint).

EOS separates documents; ``decode`` drops it (it renders as ""), like SentencePiece does.

- ``CharTokenizer``: one id per character seen in the training files (sorted), EOS last.
  A character outside the vocabulary raises a ValueError naming it and its position (no
  silent unk: a char model cannot represent it, and mapping it away would hide a data bug).
  Encoding is a vectorised numpy table lookup on the UTF-32 code points.
- ``ByteTokenizer``: UTF-8 bytes 0..255, EOS = 256; decoding uses errors="replace".
- ``SentencePieceTokenizer``: wraps a ``.model``; EOS comes from the model. Batch encoding
  uses sentencepiece's threads. :func:`train_sentencepiece` makes models the way the shipped
  one was made (identity normalisation, spaces kept, ``\\n`` a piece, byte fallback), so
  decode(encode(text)) == text for any text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from seqlm.data.sources import expand_files, iter_texts
from seqlm.data.spm_tokenizer import SentencePieceTokenizer, train_sentencepiece
from seqlm.data.tokenizer_base import FORMAT_VERSION, Tokenizer, _as_array, public_mode

__all__ = ["Tokenizer", "CharTokenizer", "ByteTokenizer", "SentencePieceTokenizer", "load_tokenizer",
           "build_tokenizer", "train_sentencepiece", "public_mode", "FORMAT_VERSION"]


class CharTokenizer(Tokenizer):
    """One id per character of ``chars`` (in the given order), EOS = len(chars)."""

    type = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"char tokenizer: vocabulary entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("char tokenizer: vocabulary has duplicate characters")
        if not chars:
            raise ValueError("char tokenizer: empty vocabulary (no text to fit on)")
        self.chars = chars
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        self._table = np.full(int(cps.max()) + 1, -1, dtype=np.int64)  # code point -> id
        self._table[cps] = np.arange(len(chars))
        self._strings = np.array(chars + [""], dtype=object)  # id -> text (EOS -> "")

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eos_id(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")  # (N,)
        n = len(self._table)
        ids = np.where(cps < n, self._table[np.minimum(cps, n - 1)], -1)
        if ids.size and ids.min() < 0:
            pos = int(np.argmax(ids < 0))
            ch = text[pos]
            raise ValueError(f"char tokenizer: character {ch!r} (U+{ord(ch):04X}) at position {pos} "
                             f"is not in the vocabulary ({len(self.chars)} characters fitted on the "
                             f"training files); refit on files that contain it or use type byte")
        return ids

    def encode_ref(self, text: str) -> list[int]:
        """Slow, obvious reference of :meth:`encode_array` (one dict lookup per character)."""
        stoi = {c: i for i, c in enumerate(self.chars)}
        return [stoi[c] for c in text]

    def decode(self, ids) -> str:
        arr = _as_array(ids)
        self._check_ids(arr)
        return "".join(self._strings[arr].tolist())

    def _spec(self) -> dict:
        return {"chars": self.chars}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOS = 256."""

    type = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        arr = _as_array(ids)
        self._check_ids(arr)
        return arr[arr != 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _spec(self) -> dict:
        return {}


def load_tokenizer(directory) -> Tokenizer:
    """Read a tokenizer saved by ``Tokenizer.save`` (a directory with tokenizer.json);
    a path to a sentencepiece ``.model`` file is accepted too."""
    d = Path(directory)
    if d.is_file() and d.suffix == ".model":
        return SentencePieceTokenizer.from_file(d)
    spec_path = d / "tokenizer.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"tokenizer {str(d)!r}: no tokenizer.json (not a saved seqlm tokenizer)")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer {str(spec_path)!r}: invalid JSON ({e})") from None
    kind = spec.get("type")
    if kind == "char":
        tok: Tokenizer = CharTokenizer(spec.get("chars") or [])
    elif kind == "byte":
        tok = ByteTokenizer()
    elif kind == "ids":  # a synthetic task's ids (seqlm/data/tasks.py)
        from seqlm.data.tasks import IdTokenizer

        tok = IdTokenizer(int(spec.get("vocab_size", 0)))
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer.from_file(d / spec.get("model_file", SentencePieceTokenizer.MODEL_FILE),
                                               field=f"tokenizer {str(d)!r}")
    elif kind == "hf":
        from seqlm.data.hf_tokenizer import HFTokenizer

        tok = HFTokenizer.from_spec(d, spec)
    else:
        raise ValueError(f"tokenizer {str(spec_path)!r}: unknown type {kind!r}; known: char, byte, sentencepiece, hf, ids")
    fp = spec.get("fingerprint")
    if fp is not None and fp != tok.fingerprint():
        raise ValueError(f"tokenizer {str(d)!r}: files do not match the fingerprint in tokenizer.json (corrupted?)")
    return tok


def build_tokenizer(cfg, files: Sequence[str] = (), text_field: str = "text", data=None) -> Tokenizer:
    """The tokenizer a ``TokenizerConfig`` describes: char fits on the text of ``files`` (field
    ``text_field`` of records), or of every source of ``data`` (a DataConfig) when given;
    sentencepiece loads ``cfg.path``."""
    if cfg.type == "char":
        if data is not None:
            from seqlm.data.dataset import source_specs

            groups = [(expand_files(s["files"], field=s["field"]), s["text_field"]) for s in source_specs(data)]
        else:
            groups = [(expand_files(files), text_field)]
        return CharTokenizer.fit(t for paths, tf in groups for p in paths for t in iter_texts(p, tf))
    if cfg.type == "byte":
        return ByteTokenizer()
    if cfg.type == "sentencepiece":
        if not cfg.path:
            raise ValueError("data.tokenizer.path: required when type is sentencepiece")
        return SentencePieceTokenizer.from_file(cfg.path, field="data.tokenizer.path")
    if cfg.type == "hf":
        from seqlm.data.hf_tokenizer import load_hf_tokenizer

        if not cfg.path:
            raise ValueError("data.tokenizer.path: required when type is hf")
        return load_hf_tokenizer(cfg.path)
    raise ValueError(f"data.tokenizer.type: unknown tokenizer type {cfg.type!r}")
