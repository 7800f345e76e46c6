"""Shared pieces of the text tasks (passkey, needle, phonebook): prompt/answer examples,
tokenised training data with -100 labels, greedy-generation scoring, JSON + heatmap output."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

IGNORE = -100


@dataclass
class TextExample:
    prompt: str
    answer: str  # the text the model must produce right after the prompt
    meta: dict = field(default_factory=dict)


def encode_checked(tok, text: str, what: str) -> list[int]:
    try:
        return list(tok.encode(text))
    except ValueError as e:
        raise ValueError(f"{what}: the tokenizer cannot encode the task text ({e})") from None


def encode_examples(tok, examples: Sequence[TextExample], seq_len: Optional[int] = None,
                    pad_id: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (inputs, labels) (N, T): inputs = prompt + answer tokens (minus the last), labels[t] =
    the answer token the model must predict after reading inputs[:t+1]; -100 elsewhere and on
    padding. T = ``seq_len`` or the longest example; longer examples raise."""
    pad = tok.eos_id if pad_id is None else pad_id
    rows = []
    for i, ex in enumerate(examples):
        p = encode_checked(tok, ex.prompt, f"example {i} prompt")
        a = encode_checked(tok, ex.answer, f"example {i} answer")
        if not p or not a:
            raise ValueError(f"example {i}: empty prompt or answer after tokenization")
        rows.append((p, a))
    T = max(len(p) + len(a) - 1 for p, a in rows)
    if seq_len is not None:
        if T > seq_len:
            raise ValueError(f"seq_len: {seq_len} is shorter than the longest example ({T} tokens)")
        T = seq_len
    x = torch.full((len(rows), T), pad, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids = p + a
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, len(p) - 1:len(ids) - 1] = torch.tensor(a)
    return x, y


@torch.no_grad()
def greedy_answers(model, tok, prompts: Sequence[str], max_new_tokens: int, what: str = "prompt") -> list[str]:
    """Greedy continuation of each prompt (decoded text)."""
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor(encode_checked(tok, p, f"{what} {i}") or [tok.eos_id])
        new = model.generate(ids, max_new_tokens, temperature=0.0)
        out.append(tok.decode(new.tolist()))
    return out


def rng(seed: int) -> random.Random:
    return random.Random(seed)


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def plot_heatmap(acc: Sequence[Sequence[float]], rows: Sequence, cols: Sequence, path, title: str,
                 xlabel: str = "depth", ylabel: str = "length (tokens)") -> Path:
    """acc[i][j] for rows[i] x cols[j] as an annotated heatmap PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i, r in enumerate(acc):
        for j, v in enumerate(r):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curve(xs, ys, path, title: str, xlabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, ys, marker="o")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_depth_length(model, tok, make: Callable[[int, float, int], TextExample], lengths, depths,
                       n_per_cell: int, score: Callable[[str, TextExample], bool], max_new_tokens: int,
                       seed: int = 0) -> dict:
    """Accuracy per (length, depth) cell: ``make(length, depth, seed)`` builds one example."""
    grid, cells = [], []
    for L in lengths:
        row = []
        for d in depths:
            exs = [make(L, d, seed * 1_000_003 + i) for i in range(n_per_cell)]
            gens = greedy_answers(model, tok, [e.prompt for e in exs], max_new_tokens)
            ok = [score(g, e) for g, e in zip(gens, exs)]
            acc = sum(ok) / len(ok)
            row.append(acc)
            cells.append({"length": L, "depth": d, "accuracy": acc, "n": len(ok),
                          "examples": [{"answer": e.answer, "generated": g} for e, g in zip(exs[:2], gens[:2])]})
        grid.append(row)
    mean = sum(sum(r) for r in grid) / max(1, sum(len(r) for r in grid))
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": grid, "mean_accuracy": mean,
            "cells": cells}
