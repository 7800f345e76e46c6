#!/usr/bin/env python
"""Print the README's benchmark tables (markdown) from bench/results/*.json.

    python scripts/bench_table.py            # print them
    python scripts/bench_table.py --write    # replace them in README.md (between the
                                             # "## Benchmarks" intro and "Against the targets")
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

R = Path(__file__).resolve().parents[1] / "bench" / "results"


def _hf_label(key: str, r: dict) -> str:
    """Row label of the HF comparison: which mixers, at which chunk sizes."""
    if r.get("block") == "mamba2":
        c, ch = r.get("chunk_size"), r.get("chunk_size_hf")
        if c == ch:
            return f"Mamba-2, both at chunk {c}"
        return f"Mamba-2, seqlm chunk {c} vs HF chunk {ch} (each one's default)"
    if r.get("block") == "mamba":
        return "Mamba-1 vs HF mambapy scan" if "mambapy" in r.get("hf_path", "") else "Mamba-1 vs HF token loop"
    return key


def load(name):
    p = R / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


START = "`python scripts/bench_table.py`.\n\n"
END = "Against the targets set in the issues:"


def write_readme(tables: str) -> None:
    readme = R.parents[1] / "README.md"
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: markers {START.strip()!r} ... {END!r} not found")
    readme.write_text(text[:i + len(START)] + tables.rstrip("\n") + "\n\n" + text[j:])


def main() -> None:
    out = []
    t = load("train_shakespeare")
    if t:
        s, p = t["seqlm"], t.get("plain_gpt", {})
        out += ["**nanoGPT CPU recipe** (`bench/train_shakespeare.py`; 4 layers, d 128, block 64, batch 12, "
                "2000 iters, char-level; 2 threads):", "",
                "| run | val loss | train wall | tokens/s | % of fp32 matmul peak |", "|---|---|---|---|---|",
                f"| nanoGPT (reference figure) | {t['nanogpt_reference']['val_loss']} | "
                f"{t['nanogpt_reference']['wall_s']} s | | |"]
        if p:
            out.append(f"| plain PyTorch GPT, same shape | {p['val_loss']:.3f} | {p['wall_s']:.0f} s | "
                       f"{p['tokens_per_s']:,.0f} | {100 * p['fraction_of_peak']:.0f}% |")
        out.append(f"| seqlm `configs/attention.yaml` | {s['val_loss']:.3f} | {s['wall_s']:.0f} s | "
                   f"{s['tokens_per_s']:,.0f} | {100 * s['fraction_of_peak']:.0f}% |")
        out += ["", f"Interleaved timing (same batches, alternating): seqlm / plain = "
                f"{t['speed_ratio_seqlm_over_plain']:.2f} (seqlm adds RoPE); matmul peak "
                f"{t['matmul_peak_gflops']:.0f} GFLOP/s.", ""]
    pr = load("presets")
    if pr:
        out += ["**Presets at the nanoGPT budget** (`bench/presets.py`; 2000 x 12 x 64 tokens, val loss on 200 "
                "fixed validation batches; nanoGPT: 1.886 in 157 s):", "",
                "| preset | pattern | params | val loss | train wall | tokens/s |", "|---|---|---|---|---|---|"]
        for n, r in pr["presets"].items():
            if "val_loss" in r:
                out.append(f"| `{n}` | `{r['pattern']}` | {r['n_params'] / 1e6:.2f}M | {r['val_loss']:.3f} | "
                           f"{r['wall_s']:.0f} s | {r['tokens_per_s']:,} |")
        out.append("")
    sc = load("scaling")
    if sc:
        out += ["**One layer vs sequence length** (`bench/scaling.py`; d_model 256, batch 1, forward+backward, "
                f"{sc.get('threads', '?')} threads; peak memory = RSS growth in a fresh process):", ""]
        rows = sc.get("blocks") or {}
        Ls = sc.get("lengths") or []
        if isinstance(rows, dict) and Ls:
            out.append("| block | " + " | ".join(f"{L // 1024}k" for L in Ls) + " | t(32k)/t(1k) |")
            out.append("|---" * (len(Ls) + 2) + "|")
            for b, r in rows.items():
                pts = {int(x["L"]): x for x in r.get("points", [])}
                cells = [f"{pts[L]['time_s']:.2f} s, {pts[L]['peak_mem_mb']:.0f} MB" if L in pts and
                         pts[L].get("time_s") is not None else "—" for L in Ls]
                ratio = (pts[32768]["time_s"] / pts[1024]["time_s"]) if 32768 in pts and 1024 in pts else None
                out.append(f"| {b} | " + " | ".join(cells) + f" | {ratio:.1f} |" if ratio else
                           f"| {b} | " + " | ".join(cells) + " | — |")
            out.append("")
    hf = load("hf_compare")
    if hf:
        out += ["**Against Hugging Face transformers' pure-PyTorch mixers** (`bench/hf_compare.py`; same weights, "
                f"fp32, batch 1, forward+backward, threads: {hf.get('threads', '?')}, median of "
                f"{hf.get('repeats', '?')} interleaved passes):", "",
                "| comparison | L | max abs diff (y) | seqlm | HF | speedup | ceiling (HF time / shared projections) |",
                "|---|---|---|---|---|---|---|"]
        for k, r in hf["results"].items():
            if r.get("status") == "ok":
                out.append(f"| {_hf_label(k, r)} | {r['L']} | {r['max_abs_diff_y']:.1e} | "
                           f"{r['fwd_bwd_s_seqlm']:.2f} s | {r['fwd_bwd_s_hf']:.2f} s | {r['speedup']:.2f}x | "
                           + (f"{r['speedup_bound_linear_layers_only']:.1f}x |"
                              if "speedup_bound_linear_layers_only" in r else "— |"))
        out.append("")
        sw = hf.get("hf_chunk_sweep")
        if sw:
            cells = ", ".join(f"{c}: {t:.2f} s" for c, t in sw["fwd_bwd_s_hf"].items())
            out += [f"HF's Mamba-2 mixer alone by chunk size (forward+backward, L={sw['L']}): {cells}; "
                    f"fastest: {sw['fastest_chunk']}.", ""]
    dc = load("decode")
    if dc:
        g, gc = dc["generation"], dc.get("generation_compiled")
        out += ["**Decode** (`bench/decode.py`; 256 new tokens after an 8192-token prompt, "
                f"{dc['params']['mamba2'] / 1e6:.1f}M Mamba-2 vs {dc['params']['attention'] / 1e6:.1f}M attention, "
                f"{dc['threads']} thread; tokens/s, eager and with the decode step compiled, `generate(compile=True)`):",
                ""]
        if gc:
            out += ["| batch | Mamba-2 eager | attention eager | ratio | Mamba-2 compiled | attention compiled | ratio "
                    "| best vs best |", "|---|---|---|---|---|---|---|---|"]
        else:
            out += ["| batch | Mamba-2 tok/s | attention tok/s | ratio |", "|---|---|---|---|"]
        for i, (m, a) in enumerate(zip(g["mamba2"], g["attention"])):
            row = (f"| {m['batch']} | {m['decode_tokens_per_s']:,.0f} | {a['decode_tokens_per_s']:,.0f} | "
                   f"{m['decode_tokens_per_s'] / a['decode_tokens_per_s']:.1f}x |")
            if gc:
                mc, ac = gc["mamba2"][i], gc["attention"][i]
                best = dc["speedup_best_mode"][f"batch_{m['batch']}"]
                row += (f" {mc['decode_tokens_per_s']:,.0f} | {ac['decode_tokens_per_s']:,.0f} | "
                        f"{mc['decode_tokens_per_s'] / ac['decode_tokens_per_s']:.1f}x | {best:.1f}x |")
            out.append(row)
        if gc:
            cs = ", ".join(f"{n} {r['compile_s']:.0f} s" for n in ("mamba2", "attention") for r in gc[n][:1])
            out.append("")
            out.append(f"Compile time in this run (batch 1, once per model and batch size; inductor's on-disk "
                       f"cache may already have held the kernels): {cs}.")
        out.append("")
    rc = load("recursive")
    if rc:
        st = rc.get("setup", {})
        out.append(f"**Relaxed recursive** (`bench/recursive.py`{' --quick' if rc.get('quick') else ''}; "
                   f"d {st.get('d_model')}, {st.get('n_layers')} layers `{st.get('pattern')}` pretrained "
                   f"{st.get('pretrain')} steps, K={st.get('groups')} shared groups, each variant then fine-tuned "
                   f"{st.get('finetune')} steps):")
        out += ["", "| variant | params | val loss after conversion | after fine-tune |", "|---|---|---|---|"]
        for r in rc.get("rows", []):
            out.append(f"| {r['name']} | {r['params']:,} | {r['val_loss_converted']:.3f} | {r['val_loss']:.3f} |")
        out.append("")
    mq = load("mqar")
    if mq and mq.get("results"):
        out += [f"**MQAR** (`bench/mqar.py`; V={mq['vocab_size']}, {mq['steps']} steps, batch {mq['batch_size']}, "
                f"lr {', '.join(str(x) for x in mq['lrs'])}, {mq['n_train']:,} training examples; "
                "accuracy over query positions on held-out examples):", "",
                "| mixer | d_model | setting (L, pairs) | accuracy | params |", "|---|---|---|---|---|"]
        for r in mq["results"]:
            out.append(f"| {r['mixer']} | {r['d_model']} | ({r['seq_len']}, {r['num_pairs']}) | "
                       f"{r['accuracy']:.3f} | {r['n_params']:,} |")
        for m, why in mq.get("notes", {}).items():
            out.append(f"| {m} | | | {why} | |")
        out.append("")
    hm = load("hmt")
    if hm:
        sv, mem, rc2 = hm["shakespeare_val"], hm["memory_growth_8x_over_1x_mib"], hm["recall"]
        out += [f"**HMT** (`bench/hmt.py`{' --quick' if hm.get('mode') == 'quick' else ''}; backbone "
                f"{hm['params']['backbone']:,} params, memory +{hm['params']['hmt_pct_of_backbone']:.2f}%, "
                f"segment {hm['segment_len']}):", "",
                "| measure | same backbone, one segment at a time | HMT |", "|---|---|---|",
                f"| Tiny Shakespeare val ({sv['n_tokens_scored']:,} tokens as one sequence), loss | "
                f"{sv['plain_segment_windows']['loss']:.3f} | {sv['hmt_one_sequence']['loss']:.3f} |",
                f"| peak memory growth, 8x longer input | {mem['plain_whole_window']:.0f} MiB (whole input as one window) | "
                f"{mem['hmt']:.1f} MiB |",
                f"| recall {rc2['task']['distance_segments']} segments back (chance {rc2['task']['chance']:.3f}) | "
                f"{rc2['no_memory']['accuracy_last_query']:.3f} | {rc2['hmt']['accuracy_last_query']:.3f} |", ""]
    tk = load("tokenize")
    if tk:
        sizes = list(next(iter(tk["tokenizers"].values()))["peak_rss_mb"])
        la = ", ".join(f"{x:.1f}" for x in tk["loadavg_start"][:1] + tk["loadavg_end"][:1])
        out += [f"**Tokenization** (`bench/tokenize.py`; a {tk['corpus_mb']:.0f} MB txt file of Tiny Shakespeare "
                f"repeated with variation; {tk['cpu']}, {tk['cores']} cores shared with other jobs, load average "
                f"{la} at start/end; best of {len(next(iter(tk['tokenizers'].values()))['runs']['1'])} alternating "
                "runs; CPU s/MB counts this process and the workers):", "",
                f"| tokenizer | 1 worker | 2 workers | speedup | CPU s/MB (1 / 2 workers) | peak RSS parent / worker, "
                f"{sizes[0]} | {sizes[1]} | relaunch, warm cache | rehash all (`verify_cache`) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, t in tk["tokenizers"].items():
            rss = [t["peak_rss_mb"][k] for k in sizes]
            out.append(f"| {name} | {t['mb_per_s_1_worker']:.2f} MB/s | {t['mb_per_s_2_workers']:.2f} MB/s | "
                       f"{t['speedup_2_workers']:.2f}x | {t['cpu_s_per_mb_1_worker']:.3f} / {t['cpu_s_per_mb_2_workers']:.3f} | "
                       + " | ".join(f"{r['parent']:.0f} / {r['worker']:.0f} MB" for r in rss)
                       + f" | {t['relaunch_warm_cache_s'] * 1e3:.1f} ms | {t['relaunch_verify_cache_s']:.2f} s |")
        out.append("")
    tables = "\n".join(out)
    if "--write" in sys.argv[1:]:
        write_readme(tables)
    else:
        print(tables)


if __name__ == "__main__":
    main()
