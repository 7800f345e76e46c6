"""Passkey retrieval: repeated filler text of a target length (in tokens) with the sentence
"The pass key is 12345. Remember it. 12345 is the pass key." inserted at a depth fraction,
then "What is the pass key? The pass key is"; correct when the first number the model
generates equals the key. Sweep length x depth -> JSON + accuracy heatmap PNG."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from seqlm.eval.tasks.common import (TextExample, encode_checked, encode_examples, plot_heatmap, rng,
                                     sweep_depth_length, write_json)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
DIGITS = "0123456789"


def needle_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def make_passkey(tok, length: int, depth: float, seed: int = 0, key_len: int = 5,
                 key_chars: str = DIGITS) -> TextExample:
    """One example whose prompt is about ``length`` tokens (at least the needle + question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: must be in [0, 1], got {depth}")
    r = rng(seed)
    key = "".join(r.choice(key_chars) for _ in range(key_len))
    if key_chars == DIGITS and key[0] == "0":
        key = str(r.randint(1, 9)) + key[1:]
    sentences = [s.strip() + " " for s in FILLER.split(". ") if s.strip()]
    sentences = [s if s.endswith(". ") else s.rstrip() + ". " for s in sentences]
    fixed = len(encode_checked(tok, needle_sentence(key) + QUESTION, "passkey"))
    per = len(encode_checked(tok, FILLER, "passkey filler")) / len(sentences)
    n = max(0, round((length - fixed) / per))
    filler = [sentences[i % len(sentences)] for i in range(n)]
    at = round(depth * n)
    text = "".join(filler[:at]) + needle_sentence(key) + "".join(filler[at:]) + QUESTION
    return TextExample(text, " " + key, {"key": key, "depth": depth, "insert_sentence": at, "n_filler": n})


def passkey_correct(generated: str, ex: TextExample) -> bool:
    m = re.search(r"\d+", generated) if ex.meta["key"].isdigit() else re.search(r"\S+", generated)
    return bool(m) and m.group(0).rstrip(".") == ex.meta["key"]


def passkey_dataset(tok, n: int, lengths: Sequence[int], seed: int = 0, seq_len=None, **kw):
    """Training data: (inputs, labels) with labels only on the key tokens (depths uniform)."""
    r = rng(seed)
    exs = [make_passkey(tok, r.choice(list(lengths)), r.random(), seed=r.randrange(1 << 30), **kw) for _ in range(n)]
    return encode_examples(tok, exs, seq_len)


def evaluate_passkey(model, tok, lengths=(256, 512, 1024), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                     n_per_cell: int = 5, seed: int = 0, out_dir=None, key_chars: str = DIGITS,
                     title: str = "passkey") -> dict:
    res = sweep_depth_length(model, tok, lambda L, d, s: make_passkey(tok, L, d, s, key_chars=key_chars),
                             lengths, depths, n_per_cell, passkey_correct, max_new_tokens=8, seed=seed)
    res["task"] = "passkey"
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "passkey.json", res)
        plot_heatmap(res["accuracy"], lengths, depths, out / "passkey.png", f"{title}: accuracy")
    return res
