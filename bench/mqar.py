"""MQAR accuracy table in the style of Zoology's Figure 2: 2-layer models (mixer + MLP) x2 of
each kind at d_model 64 and 128 on (L, k) = (64,4), (128,8), (256,16), each with an lr sweep,
best accuracy reported. Writes bench/results/mqar.json and docs/img/mqar.png, prints a
markdown table (stderr) and the JSON (stdout).

The protocol (a reduced version of Zoology's, which trains on 100k examples for 64 epochs):
V = 8192 (Zoology's generator: keys from the lower half, values from the upper half, random
filler), 20,000 training examples, batch 64, AdamW (weight decay 0.1, beta2 0.99), cosine to
lr/10 after 10 % warm-up, learning rates 1e-3, 3e-4, 3e-3, 1e-2 (in that order), at most
``--steps`` (4000) steps per run. Every ``--eval-every`` steps the run is scored on 1,000
held-out examples and stops once it reaches ``--target`` (0.99); the sweep stops at the first
learning rate that reached the target (``--full-sweep`` runs every lr). The budget per run
(steps, examples seen, wall seconds) is recorded in each cell.

    python bench/mqar.py            # the full grid: every mixer x widths 64,128 x 3 settings
    python bench/mqar.py --mixers attention --widths 64 --settings 64,4 --out a.json  # one cell
    python bench/mqar.py --merge a.json b.json   # combine cells run separately into one table
    python bench/mqar.py --quick    # CPU smoke: V = 512, d 64, (64,4),(128,8), 1 lr, 30 steps (numbers not meaningful)

A mixer whose block is not registered (e.g. a block still in progress) is skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine_info  # noqa: E402
from seqlm.eval.tasks.mqar import MQARSpec  # noqa: E402
from seqlm.eval.tasks.train_task import MIXER_PATTERNS, train_mqar  # noqa: E402

MIXERS = ("attention", "mamba", "mamba2", "h3", "hybrid")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--mixers", default=",".join(MIXERS))
    ap.add_argument("--widths", default="64,128")
    ap.add_argument("--settings", default="64,4;128,8;256,16")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lrs", default=None, help="comma-separated learning rates")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--target", type=float, default=0.99, help="stop a run once it reaches this accuracy")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations")
    ap.add_argument("--full-sweep", action="store_true", help="run every lr even after one reached --target")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", nargs="+", default=None, help="combine these result files into --out (no training)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench/results/mqar.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/img/mqar.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.merge:
        return merge(a)
    if a.quick:
        V, steps, lrs, n_train, n_test, bs = a.vocab or 512, a.steps or 30, [3e-3], a.n_train or 1000, 100, 16
        if a.widths == "64,128":
            a.widths = "64"
        if a.settings == "64,4;128,8;256,16":
            a.settings = "64,4;128,8"
    else:
        V, steps, lrs, n_train, n_test, bs = a.vocab or 8192, a.steps or 4000, [1e-3, 3e-4, 3e-3, 1e-2], \
            a.n_train or 20000, 1000, 64
    if a.lrs:
        lrs = [float(v) for v in a.lrs.split(",")]
    settings = [tuple(int(v) for v in s.split(",")) for s in a.settings.split(";")]
    widths = [int(w) for w in a.widths.split(",")]
    from seqlm.registry import blocks, pattern_chars

    chars = pattern_chars()
    results, notes = [], {}
    t_all = time.perf_counter()
    for mixer in a.mixers.split(","):
        missing = [c for c in MIXER_PATTERNS[mixer] if c not in chars]
        if missing:
            notes[mixer] = f"skipped: block not registered (pattern chars {missing}; registered {sorted(blocks())})"
            print(f"{mixer}: {notes[mixer]}", file=sys.stderr)
            continue
        for d in widths:
            for L, k in settings:
                t0 = time.perf_counter()
                try:
                    r = train_mqar(MQARSpec(L, k, V), mixer, d, n_train=n_train, n_test=n_test, lrs=lrs,
                                   steps=steps, batch_size=bs, device=a.device, eval_every=a.eval_every,
                                   target=a.target, stop_at_target=not a.full_sweep)
                except KeyError as e:  # block not registered
                    notes[mixer] = f"skipped: {e}"
                    break
                row = {"mixer": mixer, "d_model": d, "seq_len": L, "num_pairs": k, "accuracy": r["accuracy"],
                       "n_train": n_train, "max_steps": steps,
                       "best_lr": r["best_lr"], "n_params": r["best"]["n_params"],
                       "per_lr": {str(x["lr"]): x["accuracy"] for x in r["runs"]},
                       "budget_per_run": {str(x["lr"]): {"steps": x["steps"], "examples_seen": x["steps"] * bs,
                                                         "wall_s": round(x["wall_s"], 1)} for x in r["runs"]},
                       "trace": {str(x["lr"]): [(t["step"], t.get("accuracy")) for t in x["trace"]]
                                 for x in r["runs"]},
                       "wall_s": time.perf_counter() - t0}
                results.append(row)
                print(f"{mixer:9s} d={d:<4d} L={L:<4d} k={k:<3d} acc={row['accuracy']:.3f} "
                      f"lr={row['best_lr']:.0e} ({row['wall_s']:.0f}s)", file=sys.stderr)
    out = {"bench": "mqar", "quick": a.quick, "vocab_size": V, "steps": steps, "lrs": lrs, "n_train": n_train,
           "n_test": n_test, "batch_size": bs, "device": a.device, "settings": settings, "widths": widths,
           "target": a.target, "eval_every": a.eval_every, "sweep_stops_at_target": not a.full_sweep,
           "machine": machine_info(a.threads),
           "patterns": {m: MIXER_PATTERNS[m] for m in a.mixers.split(",")}, "results": results, "notes": notes,
           "wall_s": time.perf_counter() - t_all}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(markdown_table(results, settings, widths), file=sys.stderr)
    plot(results, settings, widths, a.plot, V, a.quick)
    print(json.dumps(out))
    return 0


def merge(a) -> int:
    """Combine result files (cells run in separate processes) into one table; later files win."""
    parts = [json.loads(Path(f).read_text()) for f in a.merge]
    cells = {}
    for p in parts:
        for r in p["results"]:
            key = (r["mixer"], r["d_model"], r["seq_len"])
            row = {**r, "machine": p.get("machine") or r.get("machine"), "n_train": r.get("n_train", p.get("n_train")),
                   "max_steps": r.get("max_steps", p.get("steps"))}
            if key in cells and cells[key]["accuracy"] > row["accuracy"]:  # keep the best run of a cell
                row = {**cells[key], "other_runs": cells[key].get("other_runs", []) + [
                    {k: row[k] for k in ("accuracy", "best_lr", "n_train", "max_steps", "per_lr")}]}
            elif key in cells:
                row["other_runs"] = cells[key].get("other_runs", []) + [
                    {k: cells[key][k] for k in ("accuracy", "best_lr", "n_train", "max_steps", "per_lr")}]
            cells[key] = row
    results = list(cells.values())
    settings = sorted({(r["seq_len"], r["num_pairs"]) for r in results})
    widths = sorted({r["d_model"] for r in results})
    keys = ("vocab_size", "steps", "lrs", "n_train", "n_test", "batch_size", "target", "eval_every",
            "sweep_stops_at_target")
    out = {"bench": "mqar", "quick": any(p.get("quick") for p in parts), "merged_from": a.merge,
           **{k: parts[0].get(k) for k in keys}, "settings": settings, "widths": widths,
           "machines": sorted({json.dumps(r["machine"], sort_keys=True) for r in results}),
           "results": results, "notes": {k: v for p in parts for k, v in p.get("notes", {}).items()}}
    out["machines"] = [json.loads(m) for m in out["machines"]]
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(markdown_table(results, settings, widths), file=sys.stderr)
    plot(results, settings, widths, a.plot, out["vocab_size"], out["quick"])
    print(json.dumps(out))
    return 0


def markdown_table(results, settings, widths) -> str:
    head = "| mixer | d_model | " + " | ".join(f"L={L}, k={k}" for L, k in settings) + " |"
    lines = [head, "|" + "---|" * (2 + len(settings))]
    for mixer in dict.fromkeys(r["mixer"] for r in results):
        for d in widths:
            cells = []
            for L, k in settings:
                m = [r for r in results if r["mixer"] == mixer and r["d_model"] == d and r["seq_len"] == L]
                cells.append(f"{m[0]['accuracy']:.3f}" if m else "not run")
            lines.append(f"| {mixer} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, settings, widths, path, V, quick) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), sharey=True, squeeze=False)
    for ax, (L, k) in zip(axes[0], settings):
        for mixer in dict.fromkeys(r["mixer"] for r in results):
            pts = sorted((r["d_model"], r["accuracy"]) for r in results if r["mixer"] == mixer and r["seq_len"] == L)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mixer)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_title(f"L={L}, k={k}")
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"MQAR (V={V}){' — quick smoke run' if quick else ''}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    sys.exit(main())
