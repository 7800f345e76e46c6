"""The tokenizer of a Hugging Face model directory as a seqlm tokenizer (same ids)."""
from __future__ import annotations

import json

from seqlm.data.hf_tokenizer import load_hf_tokenizer  # noqa: F401 - re-exported


def hf_tokenizer_files(tok) -> dict[str, bytes]:
    """Files for a Hugging Face directory that reproduce ``tok`` (empty when there is no
    transformers equivalent: char and byte tokenizers)."""
    if hasattr(tok, "hf_files"):
        return tok.hf_files()
    if getattr(tok, "type", "") == "sentencepiece":
        cfg = {"tokenizer_class": "LlamaTokenizer", "eos_token": tok.id_to_piece(tok.eos_id),
               "add_bos_token": False, "add_eos_token": False}
        return {"tokenizer.model": tok.model_proto, "tokenizer_config.json": json.dumps(cfg, indent=1).encode()}
    return {}
