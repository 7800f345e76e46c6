#!/usr/bin/env python
"""Training throughput with document-aware packing (``seq_idx``) vs one stream, same windows.

For each preset config (its own model; char vocabulary) the same random training windows of
Tiny Shakespeare are trained on twice, alternating step by step: stream mode (``seq_idx``
None) and document mode (``seq_idx`` from real document boundaries of the text). The model
side of document packing is what is measured here (attention masks, kernel resets, HMT per
document); producing ``seq_idx`` is the data pipeline's job and costs a cumsum per window.

Document boundaries (the shipped text has no markup; both are labelled in the JSON):
- ``scenes``: pseudo-scenes (speaker-cast heuristic, seqlm.data.corpora.shakespeare_scenes,
  ~220 documents, median ~3.7k characters), when that module is present;
- ``turns``: every speaker turn (paragraph separated by a blank line) is a document: ~7.2k
  documents of ~150 characters, several per window - the worst case for packing.
tokens/s is the median over ``--steps`` timed steps per mode (after one warm-up step each);
the ratio document/stream is measured side by side in one process.

    nice -n 10 python bench/packing.py [--seq-len 256 --batch 8 --steps 6]
Writes bench/results/packing.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import argparse
import json
import statistics
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, write_result  # noqa: E402
PRESETS = ["default", "hybrid", "mamba", "mamba2", "h3", "attention", "hmt_stage1"]


def boundaries(text: str) -> dict:
    """name -> (label, char offsets where a document starts)."""
    out = {}
    try:
        from seqlm.data.corpora import shakespeare_scenes

        scenes = shakespeare_scenes(text)
        assert "".join(scenes) == text
        out["scenes"] = ("pseudo-scenes (seqlm.data.corpora.shakespeare_scenes)",
                         np.cumsum([0] + [len(s) for s in scenes[:-1]]))
    except ImportError:
        pass
    parts = text.split("\n\n")
    out["turns"] = ("speaker turns (blank-line separated paragraphs)",
                    np.cumsum([0] + [len(p) + 2 for p in parts[:-1]]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presets", default=",".join(PRESETS))
    a = ap.parse_args()
    import torch
    import yaml

    from seqlm.config import parse_config
    from seqlm.data.tokenizers import CharTokenizer
    from seqlm.io import build_model

    torch.set_num_threads(a.threads)
    alloc = __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # as `seqlm train` runs
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.fit([text])
    ids = tok.encode_array(text).astype(np.int64)        # char-level token ids, one per character
    B, T = a.batch, a.seq_len
    rng = np.random.default_rng(0)
    out = {"bench": "packing", "cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__,
           "cpu_alloc": alloc, "seq_len": T, "batch": B, "steps": a.steps, "boundaries": {}, "results": {}}
    for bname, (label, starts) in boundaries(text).items():
        flag = np.zeros(len(ids) + 1, dtype=np.int32)
        flag[starts] = 1
        offs = rng.integers(0, len(ids) - T - 1, size=(a.steps + 1, B))
        wins = []
        for row in offs:
            x = torch.from_numpy(np.stack([ids[o:o + T] for o in row]))
            y = torch.from_numpy(np.stack([ids[o + 1:o + T + 1] for o in row]))
            f = np.stack([flag[o:o + T] for o in row])
            f[:, 0] = 0
            wins.append((x, y, torch.from_numpy(np.cumsum(f, 1).astype(np.int32))))
        docs_per_window = float(np.mean([w[2][:, -1].float().mean().item() + 1 for w in wins]))
        out["boundaries"][bname] = {"label": label, "n_documents": int(len(starts)),
                                    "mean_documents_per_window": docs_per_window}
        for preset in a.presets.split(","):
            raw = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
            raw["data"] = {"files": ["unused.txt"]}
            raw.pop("train", None), raw.pop("eval", None)
            cfg = parse_config(raw)
            torch.manual_seed(0)
            model = build_model(cfg, tok.vocab_size).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            times = {"stream": [], "document": []}
            for i, (x, y, si) in enumerate(wins):
                for mode in ("stream", "document") if i % 2 == 0 else ("document", "stream"):
                    t = time.perf_counter()
                    loss = model.loss(x, y) if mode == "stream" else model.loss(x, y, seq_idx=si)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if i > 0:
                        times[mode].append(time.perf_counter() - t)
            tps = {m: B * T / statistics.median(v) for m, v in times.items()}
            r = {"stream_tok_s": tps["stream"], "document_tok_s": tps["document"],
                 "ratio_document_over_stream": tps["document"] / tps["stream"]}
            out["results"][f"{bname}/{preset}"] = r
            print(bname, preset, json.dumps(r), file=sys.stderr, flush=True)
    write_result("packing", out)


if __name__ == "__main__":
    main()
