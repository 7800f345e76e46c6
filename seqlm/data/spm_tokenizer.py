"""SentencePiece tokenizer (BPE / unigram) and :func:`train_sentencepiece`."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from seqlm.data.sources import expand_files, iter_documents, resolve_path
from seqlm.data.tokenizer_base import Tokenizer, _as_array, _atomic_write


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE or unigram) given as serialized bytes."""

    type = "sentencepiece"
    MODEL_FILE = "sentencepiece.model"
    num_threads = None  # threads of encode_batch; None: one per CPU core

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        import sentencepiece as spm

        self.source = source
        self.model_proto = bytes(model_proto)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source!r} is not a sentencepiece model ({str(e).strip()[:200]})") from None
        if self.sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {source!r} has no EOS piece (trained with eos_id=-1); "
                             f"retrain it with `seqlm tokenizer train`")
        probe = ["ab cd\n", "  ef\n", "\n", "gh i"]  # see Tokenizer.split_safe
        self.split_safe = self.sp.encode("".join(probe)) == sum(self.sp.encode(probe), [])

    def __getstate__(self) -> dict:  # for tokenizer worker processes: the model bytes, not the C++ object
        return {"model_proto": self.model_proto, "source": self.source, "num_threads": self.num_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["source"])
        self.num_threads = state["num_threads"]

    @classmethod
    def from_file(cls, path, field: str = "path") -> "SentencePieceTokenizer":
        p = resolve_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{field}: sentencepiece model {str(path)!r} not found")
        return cls(p.read_bytes(), source=str(p))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.sp.encode(list(texts), num_threads=self.num_threads or os.cpu_count() or 1)
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids) -> str:
        arr = _as_array(ids)
        self._check_ids(arr)
        return self.sp.decode(arr.tolist())

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def _spec(self) -> dict:
        return {"model_file": self.MODEL_FILE}

    def _model_files(self) -> dict[str, bytes]:
        return {self.MODEL_FILE: self.model_proto}


def train_sentencepiece(input_files: Sequence[str], vocab_size: int, model_type: str, out_path,
                        *, text_field: str = "text", character_coverage: float = 1.0,
                        byte_fallback: bool = True, max_sentences: int = 2_000_000,
                        num_threads: int = 1) -> SentencePieceTokenizer:
    """Train a SentencePiece ``bpe`` / ``unigram`` model on the lines of the documents in
    ``input_files`` and write it to ``out_path`` atomically (nothing is left on failure).

    Lossless settings: identity normalisation, runs of spaces kept, no dummy prefix, ``\\n``
    a user-defined piece, byte fallback for characters outside the vocabulary, digits split.
    The output is byte-identical for the same input and ``num_threads`` (the model file
    records the thread count, so other counts give the same pieces in a different file)."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--type: must be bpe or unigram, got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"--vocab-size: must be an integer >= 8, got {vocab_size!r}")
    if not 0 < character_coverage <= 1:
        raise ValueError(f"--character-coverage: must be in (0, 1], got {character_coverage}")
    if max_sentences < 0 or num_threads < 1:
        raise ValueError(f"--max-sentences must be >= 0 and --threads >= 1 (got {max_sentences}, {num_threads})")
    paths = expand_files(input_files, field="--input")
    out = Path(out_path)

    def lines():
        for p in paths:
            for doc in iter_documents(p, text_field):
                yield from (ln for ln in doc.split("\n") if ln)

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            user_defined_symbols=["\n"], byte_fallback=byte_fallback, split_digits=True,
            character_coverage=character_coverage, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=1 << 14,
            num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        msg = msg.split("] ", 1)[-1]  # drop the C++ source location
        raise ValueError(f"sentencepiece training on {[str(p) for p in paths]} failed: {msg}") from None
    tok = SentencePieceTokenizer(buf.getvalue(), source=str(out))
    _atomic_write(out, tok.model_proto)
    return tok
