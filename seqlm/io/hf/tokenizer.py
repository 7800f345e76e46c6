"""The tokenizer of a Hugging Face model directory as a seqlm tokenizer (same ids)."""
from __future__ import annotations

import json

from seqlm.data.hf_tokenizer import load_hf_tokenizer  # noqa: F401 - re-exported


def hf_tokenizer_files(tok) -> dict[str, bytes]:
    """Files for a Hugging Face directory that reproduce ``tok`` (empty when there is no
    transformers equivalent: char and byte tokenizers)."""
    if hasattr(tok, "hf_files"):
        return tok.hf_files()
    if getattr(tok, "type", "") in ("char", "byte"):
        return _simple_hf_files(tok)
    if getattr(tok, "type", "") == "sentencepiece":
        cfg = {"tokenizer_class": "LlamaTokenizer", "eos_token": tok.id_to_piece(tok.eos_id),
               "add_bos_token": False, "add_eos_token": False}
        return {"tokenizer.model": tok.model_proto, "tokenizer_config.json": json.dumps(cfg, indent=1).encode()}
    return {}


EOS_TOKEN = "<|endoftext|>"


def _byte_chars() -> list[str]:
    """Byte b -> the printable character byte-level BPE tokenizers use for it (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the others for U+0100 + n in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def _simple_hf_files(tok) -> dict[str, bytes]:
    """char / byte tokenizers as a ``tokenizers`` BPE without merges (one token per character /
    byte, same ids) plus EOS as the special token <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if tok.type == "char":
        vocab = {c: i for i, c in enumerate(tok.chars)}
    else:
        vocab = {c: b for b, c in enumerate(_byte_chars())}
    if EOS_TOKEN in vocab:  # pragma: no cover - a char vocabulary never holds a 13-char string
        raise ValueError(f"tokenizer: {EOS_TOKEN!r} already in the vocabulary")
    vocab[EOS_TOKEN] = tok.eos_id
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    if tok.type == "byte":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
    else:
        tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "bos_token": None,
           "model_max_length": 1 << 30}
    return {"tokenizer.json": tk.to_str().encode(), "tokenizer_config.json": json.dumps(cfg, indent=1).encode()}
