"""Needle in a haystack on real text: a window of a text file (default
data/tinyshakespeare.txt) cut to a target length in tokens, with the needle sentence
"The secret word is <word>." inserted at a depth fraction (at a line boundary), then
"\nWhat is the secret word? The secret word is"; correct when the generated text starts
with the word. Sweep length x depth -> JSON + heatmap PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from seqlm.eval.tasks.common import (TextExample, encode_checked, encode_examples, plot_heatmap, rng,
                                     sweep_depth_length, write_json)

DEFAULT_HAYSTACK = "data/tinyshakespeare.txt"
QUESTION = "\nWhat is the secret word? The secret word is"
WORDS = ("apple", "river", "candle", "garden", "silver", "thunder", "meadow", "lantern", "harbor",
         "falcon", "marble", "violet", "copper", "winter", "saddle", "orchard")


def load_haystack(path=DEFAULT_HAYSTACK) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"haystack: no such file {str(p)!r}")
    lines = [ln + "\n" for ln in p.read_text(encoding="utf-8").split("\n")]
    if len(lines) < 10:
        raise ValueError(f"haystack: {str(p)!r} has too little text")
    return lines


def make_needle(tok, lines: Sequence[str], length: int, depth: float, seed: int = 0,
                words: Sequence[str] = WORDS) -> TextExample:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: must be in [0, 1], got {depth}")
    r = rng(seed)
    word = r.choice(list(words))
    needle = f"The secret word is {word}.\n"
    budget = length - len(encode_checked(tok, needle + QUESTION, "needle"))
    start = r.randrange(len(lines))
    hay, n = [], 0
    i = start
    while n < budget and len(hay) < len(lines):
        ln = lines[i % len(lines)]
        k = len(encode_checked(tok, ln, "haystack"))
        if n + k > budget and hay:
            break
        hay.append(ln)
        n += k
        i += 1
    at = round(depth * len(hay))
    text = "".join(hay[:at]) + needle + "".join(hay[at:]) + QUESTION
    return TextExample(text, " " + word, {"word": word, "depth": depth, "insert_line": at, "n_lines": len(hay)})


def needle_correct(generated: str, ex: TextExample) -> bool:
    return generated.strip().startswith(ex.meta["word"])


def needle_dataset(tok, n: int, lengths: Sequence[int], seed: int = 0, haystack=DEFAULT_HAYSTACK, seq_len=None):
    lines = load_haystack(haystack)
    r = rng(seed)
    exs = [make_needle(tok, lines, r.choice(list(lengths)), r.random(), r.randrange(1 << 30)) for _ in range(n)]
    return encode_examples(tok, exs, seq_len)


def evaluate_needle(model, tok, lengths=(256, 512, 1024), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                    n_per_cell: int = 5, seed: int = 0, haystack=DEFAULT_HAYSTACK, out_dir=None,
                    title: str = "needle") -> dict:
    lines = load_haystack(haystack)
    res = sweep_depth_length(model, tok, lambda L, d, s: make_needle(tok, lines, L, d, s), lengths, depths,
                             n_per_cell, needle_correct, max_new_tokens=12, seed=seed)
    res.update(task="needle", haystack=str(haystack))
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "needle.json", res)
        plot_heatmap(res["accuracy"], lengths, depths, out / "needle.png", f"{title}: accuracy")
    return res
