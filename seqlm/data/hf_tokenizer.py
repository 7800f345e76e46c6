"""Tokenizers from Hugging Face model directories: a ``tokenizer.json`` read with the
``tokenizers`` library (optional extra ``hf``), ids identical to transformers' fast tokenizer.

``encode`` applies the tokenizer's normaliser, pre-tokeniser and model and recognises added /
special tokens written in the text (``<|endoftext|>`` becomes its id), but adds no BOS/EOS
template (transformers' ``add_special_tokens=False``): documents are joined with EOS by seqlm
itself. ``decode`` drops EOS, like the other seqlm tokenizers, and keeps other special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from seqlm.data.tokenizer_base import Tokenizer, _as_array


class HFTokenizer(Tokenizer):
    type = "hf"
    MODEL_FILE = "hf_tokenizer.json"

    def __init__(self, tokenizer_json: bytes, eos_token: str, bos_token: Optional[str] = None,
                 source: str = "<bytes>"):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:  # pragma: no cover - the extra is missing
            raise ImportError("the `tokenizers` package is needed for Hugging Face tokenizers: "
                              "pip install -e '.[hf]'") from None
        self.source, self.tokenizer_json = source, bytes(tokenizer_json)
        try:
            self.tk = _Tok.from_str(self.tokenizer_json.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise ValueError(f"{source!r} is not a valid tokenizer.json ({str(e)[:200]})") from None
        self.eos_token, self.bos_token = eos_token, bos_token
        eos = self.tk.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"{source!r}: the EOS token {eos_token!r} is not in the vocabulary")
        self._eos = int(eos)
        probe = ["ab cd\n", "  ef\n", "\n", "gh i"]  # see Tokenizer.split_safe
        self.split_safe = self.encode("".join(probe)) == sum((self.encode(p) for p in probe), [])

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.tk.token_to_id(self.bos_token)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.tk.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in out]

    def decode(self, ids) -> str:
        arr = _as_array(ids)
        self._check_ids(arr)
        return self.tk.decode(arr[arr != self._eos].tolist(), skip_special_tokens=False)

    def _spec(self) -> dict:
        return {"model_file": self.MODEL_FILE, "eos_token": self.eos_token, "bos_token": self.bos_token}

    def _model_files(self) -> dict[str, bytes]:
        return {self.MODEL_FILE: self.tokenizer_json}

    @classmethod
    def from_spec(cls, directory, spec: dict) -> "HFTokenizer":
        from pathlib import Path

        p = Path(directory) / spec.get("model_file", cls.MODEL_FILE)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {str(directory)!r}: missing {p.name}")
        return cls(p.read_bytes(), spec["eos_token"], spec.get("bos_token"), source=str(p))

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json for a Hugging Face model directory."""
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
               "bos_token": self.bos_token, "model_max_length": 1 << 30}
        return {"tokenizer.json": self.tokenizer_json, "tokenizer_config.json": json.dumps(cfg, indent=1).encode()}


def _token(v):
    return v.get("content") if isinstance(v, dict) else v


def load_hf_tokenizer(path, hc: dict | None = None):
    """tokenizer.json (through ``tokenizers``) or tokenizer.model (SentencePiece). EOS: the
    ``eos_token`` of tokenizer_config.json, else config.json's ``eos_token_id``."""
    d = Path(path)
    tc = {}
    if (d / "tokenizer_config.json").is_file():
        tc = json.loads((d / "tokenizer_config.json").read_text())
    if hc is None and (d / "config.json").is_file():
        hc = json.loads((d / "config.json").read_text())
    hc = hc or {}
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as _Tok

        raw = (d / "tokenizer.json").read_bytes()
        eos, bos = _token(tc.get("eos_token")), _token(tc.get("bos_token"))
        if eos is None:
            eid = hc.get("eos_token_id")
            eid = eid[0] if isinstance(eid, list) else eid
            if eid is None:
                raise ValueError(f"{str(d)!r}: no EOS token (tokenizer_config.json eos_token or "
                                 "config.json eos_token_id)")
            eos = _Tok.from_str(raw.decode("utf-8")).id_to_token(int(eid))
        return HFTokenizer(raw, eos, bos, source=str(d / "tokenizer.json"))
    if (d / "tokenizer.model").is_file():
        from seqlm.data.spm_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.from_file(d / "tokenizer.model", field=str(d))
    raise FileNotFoundError(f"{str(d)!r}: no tokenizer.json or tokenizer.model (Hugging Face tokenizer files)")
