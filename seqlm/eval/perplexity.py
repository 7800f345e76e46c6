"""Sliding-window perplexity: every token scored exactly once, with as much context as the
window allows.

A document of ``n`` tokens has targets ``1..n-1`` (token ``t`` predicted from ``ids[:t]``;
documents read from text start with EOS, so every token of the text is a target). With a
window of ``T = min(context, n-1)`` tokens and a stride ``S <= T``, window ``k`` reads
``ids[s_k : s_k + T]`` with ``s_k = min(k*S, n-1-T)`` (the last window is moved back to end
at the document's end, so it is full length) and scores only the targets no earlier window
scored. Target ``t`` therefore sits in window ``k = max(0, ceil((t - T) / S))`` and is
predicted from ``ids[s_k : t]`` (see :func:`token_nll_ref`, the brute-force reference).

Reported per context length: loss (nats/token), perplexity, bits per token and bits per
byte (total NLL in bits / UTF-8 bytes of the scored text; tokenizer-independent), and the
per-position loss curve: mean loss at window position ``p`` over every window (all its
positions, scored or not: position ``p`` always has ``p + 1`` tokens of context), the
signature of whether a model uses long context.

Document packing (``pack=True``): documents that fit in one window are packed several to a
row with their boundaries (``seq_idx``, seqlm/ops/docs.py), so no padding is computed and
each is still scored exactly as if alone (nothing crosses a boundary: attention masks and
SSM state resets in the model); documents needing several windows run as above.

``context=None`` ("full") scores each document in one window. Windows longer than
``chunk`` tokens run through the model's stateful path chunk by chunk (KV caches, SSM states,
HMT memory), so memory stays bounded; HMT models (``unbounded_context``) thereby evaluate
inputs of any length.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LN2 = math.log(2.0)


def is_unbounded(model) -> bool:
    """True for models that handle inputs of any length themselves (HMT): an explicit
    ``unbounded_context`` attribute wins; otherwise a segment-recurrent wrapper is detected by
    its ``backbone_window`` (the HMT wrapper's bounded per-segment window)."""
    flag = getattr(model, "unbounded_context", None)
    if flag is not None:
        return bool(flag)
    return hasattr(model, "backbone_window")


def plan_windows(n: int, context: Optional[int], stride: Optional[int]) -> list[tuple[int, int, int]]:
    """Windows over a document of ``n`` tokens: a list of ``(start, length, first_scored)``;
    the window reads ``ids[start:start+length]``, predicts ``ids[start+1:start+length+1]`` and
    scores positions ``j >= first_scored`` of it (``stride=None``: ``stride = length``)."""
    if n < 2:
        return []
    T = n - 1 if context is None else min(context, n - 1)
    S = T if stride is None else min(stride, T)
    if context is not None and context < 1:
        raise ValueError(f"context: must be >= 1, got {context}")
    if S < 1:
        raise ValueError(f"stride: must be >= 1, got {stride}")
    out, k, done = [], 0, 0  # done: targets 1..done are scored
    while done < n - 1:
        s = min(k * S, n - 1 - T)
        out.append((s, T, max(0, done - s)))
        done = s + T
        k += 1
    return out


def _hidden_logprobs(model, x: torch.Tensor, y: torch.Tensor, chunk: int, seq_idx=None) -> torch.Tensor:
    """NLL of targets ``y`` (b, T) given inputs ``x`` (b, T): (b, T) float32. The LM head runs
    on ``chunk`` positions at a time (bounded logits memory); windows longer than ``chunk`` go
    through the stateful path chunk by chunk (not packed rows: ``seq_idx`` needs T <= chunk)."""
    b, T = x.shape
    if seq_idx is not None:
        h, _ = model.hidden(x, None, seq_idx=seq_idx)
        logits = model.head(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=-100)
    if T > chunk:  # stateful path: bounded activations whatever the window length
        state = model.init_state(b, T)
        pieces = [(i, x[:, i:i + chunk]) for i in range(0, T, chunk)]
    else:
        state, pieces = None, [(0, x)]
    out = None  # (b, T), filled in place: no list of pieces to join (which fragmented the heap)
    for i, xi in pieces:
        h, state = model.hidden(xi, state)  # (b, c, D)
        for j in range(0, h.shape[1], chunk):
            logits = model.head(h[:, j:j + chunk])  # (b, c, V)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            c = logits.shape[1]
            nll = F.cross_entropy(logits.transpose(1, 2), y[:, i + j:i + j + c], reduction="none", ignore_index=-100)
            if out is None:
                out = nll.new_empty(b, T)
            out[:, i + j:i + j + c] = nll
    return out if out is not None else torch.zeros(b, T, device=x.device)


@torch.no_grad()
def score_documents(model, docs: Sequence[Sequence[int]], context: Optional[int], stride: Optional[int] = None,
                    batch_size: int = 8, chunk: int = 2048, progress: bool = True,
                    return_token_nll: bool = False, pack: bool = False) -> dict:
    """Score token documents with sliding windows (module doc). Returns ``nll`` (total, nats),
    ``n_tokens`` (targets scored), ``pos_sum`` / ``pos_cnt`` (per-position sums and counts),
    ``counts`` (times each target was scored, per document: all ones) and, with
    ``return_token_nll``, ``token_nll`` (per document, the NLL of targets 1..n-1)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    arrays = [np.asarray(d, dtype=np.int64) for d in docs]
    jobs = [(di, s, T, j0) for di, a in enumerate(arrays) for s, T, j0 in plan_windows(len(a), context, stride)]
    rows = []
    if pack:  # whole-document windows of at most `cap` tokens: packed rows of several documents
        cap = min(context or chunk, chunk)
        nwin = np.bincount([j[0] for j in jobs], minlength=len(arrays))
        packable = [j for j in jobs if nwin[j[0]] == 1 and j[2] <= cap]
        jobs = [j for j in jobs if not (nwin[j[0]] == 1 and j[2] <= cap)]
        rows = _pack_rows(packable, cap)
    jobs.sort(key=lambda j: -j[2])  # equal lengths batch together without padding
    tok_nll = [np.zeros(max(0, len(a) - 1)) for a in arrays]
    counts = [np.zeros(max(0, len(a) - 1), dtype=np.int64) for a in arrays]
    Tmax = max((j[2] for j in jobs), default=0)
    if rows:
        Tmax = max(Tmax, max(j[2] for r in rows for j in r))
    pos_sum, pos_cnt = np.zeros(Tmax), np.zeros(Tmax, dtype=np.int64)
    bar = tqdm(total=len(jobs) + sum(map(len, rows)), disable=not progress, desc=f"ppl ctx={context or 'full'}",
               unit="win", dynamic_ncols=True, leave=False)
    for b0 in range(0, len(rows), batch_size):
        batch = rows[b0:b0 + batch_size]
        L = max(sum(j[2] for j in r) for r in batch)
        x = torch.zeros(len(batch), L, dtype=torch.long)
        y = torch.full((len(batch), L), -100, dtype=torch.long)
        si = torch.zeros(len(batch), L, dtype=torch.long)
        for r, row in enumerate(batch):
            o = 0
            for d, (di, s, T, _) in enumerate(row):
                w = torch.from_numpy(arrays[di][s:s + T + 1])
                x[r, o:o + T], y[r, o:o + T], si[r, o:] = w[:-1], w[1:], d
                o += T
            si[r, o:] = len(row)  # padding: a document of its own
        nll = _hidden_logprobs(model, x.to(dev), y.to(dev), chunk, si.to(dev)).double().cpu().numpy()
        for r, row in enumerate(batch):
            o = 0
            for di, s, T, _ in row:
                pos_sum[:T] += nll[r, o:o + T]
                pos_cnt[:T] += 1
                tok_nll[di][:T] = nll[r, o:o + T]
                counts[di][:T] += 1
                o += T
        bar.update(sum(map(len, batch)))
    for b0 in range(0, len(jobs), batch_size):
        batch = jobs[b0:b0 + batch_size]
        L = max(j[2] for j in batch)
        x = torch.zeros(len(batch), L, dtype=torch.long)
        y = torch.full((len(batch), L), -100, dtype=torch.long)  # right padding: causal models ignore it
        for r, (di, s, T, _) in enumerate(batch):
            w = torch.from_numpy(arrays[di][s:s + T + 1])
            x[r, :T], y[r, :T] = w[:-1], w[1:]
        nll = _hidden_logprobs(model, x.to(dev), y.to(dev), chunk).double().cpu().numpy()  # (b, L)
        for r, (di, s, T, j0) in enumerate(batch):
            pos_sum[:T] += nll[r, :T]
            pos_cnt[:T] += 1
            tok_nll[di][s + j0:s + T] = nll[r, j0:T]  # target s+1+j sits at index s+j
            counts[di][s + j0:s + T] += 1
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    res = {"nll": float(sum(t.sum() for t in tok_nll)), "n_tokens": int(sum(len(t) for t in tok_nll)),
           "pos_sum": pos_sum, "pos_cnt": pos_cnt, "counts": counts}
    if return_token_nll:
        res["token_nll"] = tok_nll
    return res


def _pack_rows(jobs, cap: int) -> list[list]:
    """First-fit decreasing: single-window jobs (di, 0, T, 0) into rows of at most cap tokens."""
    rows, room = [], []
    for j in sorted(jobs, key=lambda j: -j[2]):
        for i, r in enumerate(room):
            if j[2] <= r:
                rows[i].append(j)
                room[i] -= j[2]
                break
        else:
            rows.append([j])
            room.append(cap - j[2])
    return rows


@torch.no_grad()
def token_nll_ref(model, ids: Sequence[int], context: Optional[int], stride: Optional[int] = None) -> np.ndarray:
    """Brute-force reference: for every target ``t`` one model call on exactly the context the
    window rule gives it, ``ids[s:t]`` with ``s = min(k*S, n-1-T)``, ``k = max(0, ceil((t-T)/S))``."""
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    n = len(ids)
    T = n - 1 if context is None else min(context, n - 1)
    S = T if stride is None else min(stride, T)
    dev = next(model.parameters()).device
    out = np.zeros(n - 1)
    for t in range(1, n):
        k = max(0, -(-(t - T) // S))
        s = min(k * S, n - 1 - T)
        logits, _ = model(ids[None, s:t].to(dev))
        out[t - 1] = -torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item()
    return out


def summarize(res: dict, n_bytes: Optional[int], max_points: int = 512) -> dict:
    """Loss / ppl / bits from :func:`score_documents` output; the curve binned to
    <= ``max_points`` points (``positions`` are the bins' first positions)."""
    n = max(res["n_tokens"], 1)
    loss = res["nll"] / n
    out = {"n_tokens": res["n_tokens"], "loss": loss, "ppl": math.exp(min(loss, 700.0)),
           "bits_per_token": loss / LN2,
           "bits_per_byte": (res["nll"] / LN2 / n_bytes) if n_bytes else None,
           "n_bytes": n_bytes}
    s, c = res["pos_sum"], res["pos_cnt"]
    P = len(s)
    width = max(1, -(-P // max_points))
    pos, curve, cnt = [], [], []
    for a in range(0, P, width):
        k = int(c[a:a + width].sum())
        if k:
            pos.append(a)
            curve.append(float(s[a:a + width].sum() / k))
            cnt.append(k)
    out["curve"] = {"position": pos, "loss": curve, "count": cnt, "bin_width": width}
    return out


def encode_documents(tokenizer, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """Text documents -> token arrays starting with EOS (so every text token is a target) and
    the total UTF-8 byte count."""
    docs, n_bytes = [], 0
    for i, t in enumerate(texts):
        ids = np.asarray(tokenizer.encode(t), dtype=np.int64)
        if ids.size == 0:
            raise ValueError(f"document {i}: encodes to no tokens (empty text)")
        docs.append(np.concatenate([[tokenizer.eos_id], ids]))
        n_bytes += len(t.encode("utf-8"))
    return docs, n_bytes


def evaluate_perplexity(model, tokenizer, texts: Sequence[str], contexts: Sequence[Optional[int]],
                        stride: Optional[int] = None, batch_size: int = 8, chunk: int = 2048,
                        progress: bool = True, pack: bool = False) -> dict:
    """Perplexity of text documents at each context length (None = full document).
    ``stride`` None means half the context (rounded up). ``pack``: short documents packed
    several to a window with their boundaries (module doc). Returns {"contexts": {ctx: summary}}."""
    docs, n_bytes = encode_documents(tokenizer, texts)
    return evaluate_token_documents(model, docs, n_bytes, contexts, stride, batch_size, chunk, progress, pack)


def evaluate_token_documents(model, docs, n_bytes, contexts, stride=None, batch_size=8, chunk=2048,
                             progress=True, pack=False) -> dict:
    results = {}
    for ctx in contexts:
        if ctx is not None and stride is not None and stride > ctx:
            raise ValueError(f"stride: {stride} is larger than context {ctx}; every token would "
                             f"not be scored (use stride <= the smallest context)")
        st = stride if stride is not None else (None if ctx is None else max(1, -(-ctx // 2)))
        res = score_documents(model, docs, ctx, st, batch_size, chunk, progress, pack=pack)
        results[str(ctx) if ctx is not None else "full"] = {"context": ctx, "stride": st, **summarize(res, n_bytes)}
    return {"n_documents": len(docs), "unbounded_model": is_unbounded(model), "contexts": results}


def plot_curves(result: dict, png_path, title: str = "") -> None:
    """Per-position loss curves (one line per context length) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in result["contexts"].items():
        c = r["curve"]
        if c["position"]:
            ax.plot(np.asarray(c["position"]) + 1, c["loss"], lw=1.2,
                    label=f"ctx {name}: ppl {r['ppl']:.2f}, {r['bits_per_byte'] or float('nan'):.3f} bpb")
    ax.set_xscale("log")
    ax.set_xlabel("position in window (tokens of context)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title or "loss vs position")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
