#!/usr/bin/env python
"""Issue 4 benchmark: HMT (He et al.) around a small attention backbone, on CPU.

(a) Tiny Shakespeare, char-level. The same backbone (attention + MLP layers) is trained
    twice through seqlm's own loop on equal terms: the same steps, batch and window
    (``segments_per_window`` x segment_len tokens per example), so both see the same training
    tokens. One is a plain LM on those windows, the other the HMT stage-1 wrapper (memory,
    sensory memory) reading them segment by segment. Both are then scored on the validation
    split as ONE sequence by ``seqlm.eval.perplexity`` (every token scored once): HMT over the
    whole sequence in one pass (segment by segment with memory); the plain LM (i) with a
    sliding window of HMT's effective context, segment_len + n_sensory tokens with stride
    segment_len, so every scored token sees between n_sensory and segment_len + n_sensory
    tokens as in an HMT segment (the matched baseline: what is left is memory), (ii) with a
    sliding window of its full training context (stride half of it), and (iii) in
    non-overlapping segment_len windows (the earlier, unmatched baseline, kept for reference).
    Each score reports the evaluation time per token. Peak memory vs input length: a fresh
    subprocess per (model, length) runs that same full-sequence evaluation (chunk 1024, the
    streaming path) on 1x, 2x, 4x, 8x the base length and reports the growth of its resident
    set during the evaluation: the peak RSS (VmHWM, reset through /proc/self/clear_refs after
    loading and a warm-up) minus the RSS right before it. Rows: HMT; the plain LM with the
    matched sliding window; the plain LM scoring the whole input as one window (its KV cache
    grows with the input).
(b) Synthetic long-range recall: a sequence of ``S`` segments; segment 0 starts with a marker
    and a value token (one of K), the rest is random filler; every later segment ends with a
    query whose target is the value (1..S-1 segments back; the queries of all segments are
    trained, a curriculum over distances). HMT (memory only: the value is outside the sensory
    window) runs over the whole sequence; the same backbone without memory runs segment by
    segment (a window of one segment). Reported: accuracy per distance on held-out sequences,
    headline = the last query, S-1 >= 2 segments back (chance = 1/K).

Prints one JSON object, writes bench/results/hmt.json and docs/img/hmt_memory.png.

    python bench/hmt.py --quick      # CPU minutes
    python bench/hmt.py              # longer training, full validation split
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine_info  # noqa: E402

BACKBONE = {"d_model": 128, "pattern": "*-", "n_layers": 4, "norm": "layernorm",
            "block_defaults": {"attention": {"n_heads": 4}, "mlp": {"kind": "gelu"}}}


def run_cfg(out_dir: Path, seq_len: int, steps: int, memory=None, threads: int = 1) -> dict:
    d = {"model": BACKBONE,
         "data": {"files": [str(ROOT / "data/tinyshakespeare.txt")], "tokenizer": {"type": "char"},
                  "cache_dir": str(ROOT / ".cache/seqlm")},
         "train": {"seq_len": seq_len, "batch_size": 12, "max_steps": steps, "lr": 2e-3, "min_lr": 1e-4,
                   "warmup_steps": max(1, steps // 20), "out_dir": str(out_dir), "progress": False,
                   "log_every": max(1, steps // 10), "threads": threads, "device": "cpu"},
         "eval": {"every": 0, "batches": 10, "sample_tokens": 0}}
    if memory is not None:
        d["memory"] = memory
    return d


# -------------------------------------------------------------------------------------
# (a) Tiny Shakespeare


def val_tokens(ckpt: str):
    """The validation split (the tail val_fraction of the token cache) as one sequence."""
    from seqlm.data.dataset import load_data
    from seqlm.io.checkpoint import load_model

    _, cfg, tok = load_model(ckpt)
    data = load_data(cfg.data, tok, seq_len=8)
    return [int(tok.eos_id)] + data.split("val").astype("int64").tolist()


def score_sequence(ckpt: str, ids: list, context, chunk: int = 1024, stride=None) -> dict:
    from seqlm.eval.perplexity import score_documents, summarize
    from seqlm.io.checkpoint import load_model

    model, _, _ = load_model(ckpt)
    t0 = time.perf_counter()
    res = score_documents(model, [ids], context, stride, batch_size=1, chunk=chunk, progress=False)
    s = summarize(res, None)
    dt = time.perf_counter() - t0
    return {"loss": s["loss"], "ppl": s["ppl"], "bits_per_token": s["bits_per_token"], "n_tokens": s["n_tokens"],
            "context": context, "stride": stride, "eval_s": dt, "eval_us_per_token": 1e6 * dt / s["n_tokens"]}


def measure_child(ckpt: str, n: int, context, stride=None) -> None:
    """Subprocess body: score n validation tokens (one window, or windows of ``context``);
    print RSS numbers as JSON."""
    torch.set_num_threads(1)
    from seqlm.eval.perplexity import score_documents
    from seqlm.io.checkpoint import load_model

    model, _, _ = load_model(ckpt)
    ids = (val_tokens(ckpt) * (1 + n // 100000))[:n]
    with torch.no_grad():  # warm-up on a short input: allocator / thread pools / lazy imports
        score_documents(model, [ids[:300]], None, batch_size=1, chunk=1024, progress=False)
    before = _rss_kib("VmRSS")
    try:  # reset the peak (VmHWM) to the current RSS, so the peak is the evaluation's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:  # pragma: no cover - then the peak may include loading (reported)
        method = "ru_maxrss"
    t0 = time.perf_counter()
    if context == "model":  # the model alone: its stateful path in 1024-token chunks, outputs dropped
        with torch.no_grad():
            x, st = torch.tensor(ids)[None], model.init_state(1, n)
            for i in range(0, n, 1024):
                h, st = model.hidden(x[:, i:i + 1024], st)
                model.head(h)
    else:
        score_documents(model, [ids], context, stride, batch_size=1, chunk=1024, progress=False)
    wall = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if method != "ru_maxrss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
                      "delta_mib": (peak - before) / 1024, "method": method, "wall_s": wall,
                      "us_per_token": 1e6 * wall / n}))


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(ckpt: str, n: int, context=None, stride=None) -> dict:
    cmd = [sys.executable, __file__, "--measure-child", ckpt, str(n), str(context or "full"), str(stride or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------
# (b) synthetic long-range recall


def recall_batch(B: int, S: int, L: int, K: int, n_filler: int, gen: torch.Generator):
    """Tokens (B, S*L) and the value to recall (B,). Vocabulary: values 0..K-1, fillers
    K..K+n_filler-1, marker K+n_filler, query K+n_filler+1. Segment 0 opens with
    [marker, value]; every later segment ends with a query whose target is the value, so
    segment n's query needs a token n segments back."""
    marker, query = K + n_filler, K + n_filler + 1
    x = torch.randint(K, K + n_filler, (B, S * L), generator=gen)
    v = torch.randint(0, K, (B,), generator=gen)
    x[:, 0], x[:, 1] = marker, v
    x[:, 2 * L - 1::L] = query
    return x, v


def recall_logits(model, x: torch.Tensor, L: int, use_memory: bool) -> torch.Tensor:
    """Logits at the S-1 query positions (B, S-1, V). Without memory the backbone runs
    segment by segment (each segment alone: a window of one segment)."""
    B, T = x.shape
    if use_memory:
        logits, _ = model(x)
    else:
        logits, _ = model(x.view(B * (T // L), L))
        logits = logits.view(B, T, -1)
    return logits[:, 2 * L - 1::L]


def train_recall(use_memory: bool, S: int, L: int, K: int, steps: int, n_memory: int = 1, lr: float = 3e-3,
                 seed: int = 0) -> dict:
    from seqlm.config import parse_config
    from seqlm.io import build_model

    n_filler = 8
    V = K + n_filler + 2
    d = {"model": {**BACKBONE, "d_model": 64, "vocab_size": V}}
    if use_memory:  # sensory window smaller than the distance: the value must go through memory
        d["memory"] = {"segment_len": L, "n_memory": n_memory, "n_sensory": 4}
    torch.manual_seed(seed)
    model = build_model(parse_config(d))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, v = recall_batch(32, S, L, K, n_filler, gen)
        lg = recall_logits(model, x, L, use_memory)  # (B, S-1, V)
        loss = F.cross_entropy(lg.reshape(-1, V), v.repeat_interleave(S - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tg = torch.Generator().manual_seed(10_000 + seed)
    correct, total = torch.zeros(S - 1), 0
    with torch.no_grad():
        for _ in range(8):
            x, v = recall_batch(64, S, L, K, n_filler, tg)
            correct += (recall_logits(model, x, L, use_memory).argmax(-1) == v[:, None]).float().sum(0)
            total += len(v)
    acc = (correct / total).tolist()
    res = {"accuracy_last_query": acc[-1], "accuracy_by_distance_segments": {str(i + 1): a for i, a in enumerate(acc)},
           "n_eval": total, "final_train_loss": sum(losses[-20:]) / 20, "train_s": time.perf_counter() - t0,
           "steps": steps}
    res["params"] = model.param_counts() if use_memory else {"backbone": model.num_params()}
    return res


# -------------------------------------------------------------------------------------


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in result["memory_vs_length"].items():
        ax.plot([r["n"] for r in rows], [r["delta_mib"] for r in rows], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens, scored as one sequence)")
    ax.set_ylabel("peak RSS growth during eval (MiB)")
    ax.set_title("HMT: memory bounded by the segment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def memory_only(args) -> None:
    """Peak RSS growth vs input length for the rows of the full mode, plus the HMT model's own
    stateful pass (no scoring bookkeeping), on models trained 2 steps."""
    torch.set_num_threads(args.threads)
    import contextlib
    import io

    from seqlm.config import parse_config
    from seqlm.train.loop import train

    L, n_sens = 64, 16
    mem_cfg = {"type": "hmt", "segment_len": L, "n_memory": 1, "n_sensory": n_sens, "bptt_depth": 4}
    out, ck = Path(args.out) / "memory_only", {}
    for name, mem in (("plain", None), ("hmt", mem_cfg)):
        with contextlib.redirect_stdout(io.StringIO()):
            ck[name] = train(parse_config(run_cfg(out / name, 4 * L, 2, mem, args.threads)))["checkpoint"]
    lengths = [8192 * m for m in (1, 2, 4, 8)]
    eff = L + n_sens
    rows = {"hmt model alone (stateful 1024-token chunks, outputs dropped)": [
                measure(ck["hmt"], n, "model") for n in lengths],
            "hmt (streaming, segment window), scored": [measure(ck["hmt"], n) for n in lengths],
            f"plain LM, sliding window {eff} stride {L} (matched), scored": [
                measure(ck["plain"], n, eff, L) for n in lengths],
            "plain LM, whole input as one window (KV cache), scored": [measure(ck["plain"], n) for n in lengths]}
    result = {"mode": "memory_only", "threads": args.threads, "machine": machine_info(args.threads),
              "backbone": BACKBONE, "memory": mem_cfg, "memory_vs_length": rows,
              "growth_8x_over_1x_mib": {k: v[-1]["delta_mib"] - v[0]["delta_mib"] for k, v in rows.items()},
              "memory_method": "as the full mode: fresh subprocess per point, peak RSS reset after loading and "
                               "a warm-up, delta = VmHWM after - VmRSS before"}
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/hmt_memory.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["growth_8x_over_1x_mib"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short training, truncated validation (CPU minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recall-steps", type=int, default=None, help="recall task training steps")
    ap.add_argument("--recall-segments", type=int, default=3, help="recall task: segments (distance S-1)")
    ap.add_argument("--recall-n-memory", type=int, default=4, help="recall task: HMT n_memory")
    ap.add_argument("--recall-lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "runs/bench_hmt"))
    ap.add_argument("--memory-only", action="store_true",
                    help="only the memory-vs-length rows, on 2-step models (memory does not depend on the "
                         "weights' values), plus the HMT model alone; writes bench/results/hmt_memory.json")
    ap.add_argument("--measure-child", nargs=4, metavar=("CKPT", "N", "CONTEXT", "STRIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_child:
        ck, n, ctx, st = args.measure_child
        context = {"full": None, "model": "model"}[ctx] if not ctx.isdigit() else int(ctx)
        measure_child(ck, int(n), context, int(st) or None)
        return
    if args.memory_only:
        memory_only(args)
        return
    torch.set_num_threads(args.threads)
    from seqlm.config import parse_config
    from seqlm.train.loop import train

    quick = args.quick
    L, spw, n_sens = 64, 4, 16  # segment length, segments per training window, sensory tokens
    steps = 150 if quick else 1000
    out = Path(args.out)
    mem_cfg = {"type": "hmt", "segment_len": L, "n_memory": 1, "n_sensory": n_sens, "bptt_depth": spw}
    t0 = time.perf_counter()
    import contextlib
    import io

    runs = {}
    for name, seq_len, mem in (("plain", spw * L, None), ("hmt", spw * L, mem_cfg)):  # equal tokens, steps
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            r = train(parse_config(run_cfg(out / name, seq_len, steps, mem, args.threads)))
        runs[name] = {"checkpoint": r["checkpoint"], "train_wall_s": r["wall_s"], "n_params": r["n_params"],
                      "train_tokens_per_s": r["tokens_per_s"], "train_us_per_token": 1e6 / r["tokens_per_s"],
                      "train_tokens": steps * 12 * seq_len, "seq_len": seq_len, "final_train_loss": r["train_loss"],
                      "log": buf.getvalue().strip().splitlines()[-1:]}
    from seqlm.io.checkpoint import load_model

    hmt_model, _, _ = load_model(runs["hmt"]["checkpoint"])
    counts = hmt_model.param_counts()
    del hmt_model

    ids = val_tokens(runs["plain"]["checkpoint"])
    n_val_full = len(ids) - 1
    if quick:
        ids = ids[:16385]
    eff = L + n_sens  # HMT's effective direct context: sensory + segment
    ppl = {"hmt_one_sequence": score_sequence(runs["hmt"]["checkpoint"], ids, None),
           "plain_sliding_matched": score_sequence(runs["plain"]["checkpoint"], ids, eff, stride=L),
           "plain_sliding_train_context": score_sequence(runs["plain"]["checkpoint"], ids, spw * L, stride=spw * L // 2),
           "plain_segment_windows": score_sequence(runs["plain"]["checkpoint"], ids, L)}

    base = 2048 if quick else 8192
    lengths = [base * m for m in (1, 2, 4, 8)]
    mem_rows = {"hmt (streaming, segment window)": [measure(runs["hmt"]["checkpoint"], n) for n in lengths],
                f"plain LM, sliding window {eff} stride {L} (matched)": [
                    measure(runs["plain"]["checkpoint"], n, eff, L) for n in lengths],
                "plain LM, whole input as one window (KV cache)": [measure(runs["plain"]["checkpoint"], n)
                                                                  for n in lengths]}
    S, Lr, K = args.recall_segments, 16, 8
    rsteps = args.recall_steps or (1500 if quick else 3000)
    recall = {"task": {"segments": S, "segment_len": Lr, "values": K, "distance_segments": S - 1,
                       "chance": 1 / K, "headline": "accuracy_last_query", "n_memory": args.recall_n_memory,
                       "lr": args.recall_lr},
              "hmt": train_recall(True, S, Lr, K, rsteps, args.recall_n_memory, args.recall_lr),
              "no_memory": train_recall(False, S, Lr, K, rsteps, lr=args.recall_lr)}

    h = mem_rows["hmt (streaming, segment window)"]
    p = mem_rows["plain LM, whole input as one window (KV cache)"]
    m = mem_rows[f"plain LM, sliding window {eff} stride {L} (matched)"]
    result = {
        "mode": "quick" if quick else "full", "threads": args.threads, "machine": machine_info(args.threads),
        "backbone": BACKBONE, "equal_terms": {"steps": steps, "batch_size": 12, "seq_len": spw * L,
                                              "train_tokens_each": steps * 12 * spw * L},
        "segment_len": L, "memory": mem_cfg, "train_steps": steps,
        "params": counts, "runs": runs,
        "shakespeare_val": {"n_tokens_scored": ppl["hmt_one_sequence"]["n_tokens"],
                            "val_split_tokens": n_val_full, "truncated": quick, **ppl},
        "memory_vs_length": mem_rows,
        "memory_growth_8x_over_1x_mib": {"hmt": h[-1]["delta_mib"] - h[0]["delta_mib"],
                                          "plain_sliding_matched": m[-1]["delta_mib"] - m[0]["delta_mib"],
                                          "plain_whole_window": p[-1]["delta_mib"] - p[0]["delta_mib"]},
        "recall": recall, "wall_s": time.perf_counter() - t0,
        "memory_method": "fresh subprocess per point; after loading and a warm-up the peak RSS is reset "
                         "(/proc/self/clear_refs 5), then delta = VmHWM after the evaluation - VmRSS before; "
                         "torch CPU tensors live in RSS",
    }
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/hmt.json").write_text(json.dumps(result, indent=1))
    plot(result, ROOT / "docs/img/hmt_memory.png")
    print(json.dumps(result))


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    main()
