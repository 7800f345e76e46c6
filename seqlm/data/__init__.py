"""Tokenizers (char, byte, SentencePiece), text sources and memmapped token datasets."""
from seqlm.data.dataset import TokenData, load_data
from seqlm.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer, Tokenizer,
                                   build_tokenizer, load_tokenizer, train_sentencepiece)

__all__ = ["Tokenizer", "CharTokenizer", "ByteTokenizer", "SentencePieceTokenizer", "load_tokenizer",
           "build_tokenizer", "train_sentencepiece", "TokenData", "load_data"]
