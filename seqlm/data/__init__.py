"""Tokenizers (char, byte, SentencePiece), text sources and memmapped token datasets."""
from seqlm.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer, Tokenizer,
                                   build_tokenizer, load_tokenizer, train_sentencepiece)

__all__ = ["Tokenizer", "CharTokenizer", "ByteTokenizer", "SentencePieceTokenizer", "load_tokenizer",
           "build_tokenizer", "train_sentencepiece", "TokenData", "load_data"]


def __getattr__(name: str):
    # the dataset (and torch) load on first use: tokenizer worker processes import only
    # seqlm.data.pipeline and stay small
    if name in ("TokenData", "load_data"):
        from seqlm.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'seqlm.data' has no attribute {name!r}")
