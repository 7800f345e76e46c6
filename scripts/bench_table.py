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


def machine(d) -> str:
    """The machine a bench ran on, from its JSON's ``machine`` record (bench/machine.py)."""
    m = (d or {}).get("machine")
    if not m:
        return "machine: not recorded in this JSON (an earlier run, before benches recorded it)"
    isa = "/".join(m.get("cpu_isa") or []) or "ISA unknown"
    return (f"machine: {m.get('cpu_model', '?')} ({isa}), {m.get('cpu_count', '?')} cores, "
            f"{m.get('threads', '?')} thread(s), torch {m.get('torch', '?')}")


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
                f"2000 iters, char-level; 2 threads; {machine(t)}):", "",
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
                f"fixed validation batches; nanoGPT: 1.886 in 157 s; {machine(pr)}):", "",
                "| preset | pattern | params | val loss | train wall | tokens/s |", "|---|---|---|---|---|---|"]
        for n, r in pr["presets"].items():
            if "val_loss" in r:
                out.append(f"| `{n}` | `{r['pattern']}` | {r['n_params'] / 1e6:.2f}M | {r['val_loss']:.3f} | "
                           f"{r['wall_s']:.0f} s | {r['tokens_per_s']:,} |")
        out.append("")
    sc = load("scaling")
    if sc:
        out += ["**One layer vs sequence length** (`bench/scaling.py`; d_model 256, batch 1, forward+backward, "
                f"{sc.get('threads', '?')} thread(s), best of {sc.get('repeats', '?')} passes; CPU time = the process's, "
                f"which load on the shared cores does not inflate; peak memory = RSS growth in a fresh process; "
                f"{machine(sc)}):", ""]
        rows = sc.get("blocks") or {}
        Ls = sc.get("lengths") or []
        if isinstance(rows, dict) and Ls:
            out.append("| block | " + " | ".join(f"{L // 1024}k" for L in Ls) + " | t(32k)/t(1k) | same, CPU time |")
            out.append("|---" * (len(Ls) + 3) + "|")
            for b, r in rows.items():
                pts = {int(x["L"]): x for x in r.get("points", [])}
                cells = [f"{pts[L]['time_s']:.2f} s, {pts[L]['peak_mem_mb']:.0f} MB" if L in pts and
                         pts[L].get("time_s") is not None else "—" for L in Ls]
                both = 32768 in pts and 1024 in pts
                ratio = f"{pts[32768]['time_s'] / pts[1024]['time_s']:.1f}" if both else "—"
                cpu = (f"{pts[32768]['cpu_s'] / pts[1024]['cpu_s']:.1f}" if both and pts[1024].get("cpu_s")
                       else "—")
                out.append(f"| {b} | " + " | ".join(cells) + f" | {ratio} | {cpu} |")
            out.append("")
    hf = load("hf_compare")
    if hf:
        out += ["**Against Hugging Face transformers' pure-PyTorch mixers** (`bench/hf_compare.py`; same weights, "
                f"fp32, batch 1, forward+backward, threads: {hf.get('threads', '?')}, median of "
                f"{hf.get('repeats', '?')} interleaved passes; {machine(hf)}):", "",
                "| comparison | L | max abs diff (y) | seqlm | HF | speedup | ceiling (HF time / shared projections) "
                "| speedup outside the projections |",
                "|---|---|---|---|---|---|---|---|"]
        for k, r in hf["results"].items():
            if r.get("status") == "ok":
                out.append(f"| {_hf_label(k, r)} | {r['L']} | {r['max_abs_diff_y']:.1e} | "
                           f"{r['fwd_bwd_s_seqlm']:.2f} s | {r['fwd_bwd_s_hf']:.2f} s | {r['speedup']:.2f}x | "
                           + (f"{r['speedup_bound_linear_layers_only']:.1f}x |"
                              if "speedup_bound_linear_layers_only" in r else "— |")
                           + (f" {r['speedup_excluding_linear_layers']:.1f}x |"
                              if "speedup_excluding_linear_layers" in r else " — |"))
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
                f"{dc['threads']} thread; tokens/s, eager and with the decode step compiled, `generate(compile=True)`; "
                f"{machine(dc)}):",
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
                   f"{st.get('finetune')} steps; {machine(rc)}):")
        out += ["", "| variant | params | val loss after conversion | after fine-tune |", "|---|---|---|---|"]
        for r in rc.get("rows", []):
            out.append(f"| {r['name']} | {r['params']:,} | {r['val_loss_converted']:.3f} | {r['val_loss']:.3f} |")
        out.append("")
    mq = load("mqar")
    if mq and mq.get("results"):
        grid = [(64, 4), (128, 8), (256, 16)]  # the protocol's settings (Zoology's first three)
        settings = sorted(set(grid) | {tuple(x) for x in mq["settings"]})
        machines = mq.get("machines") or [mq.get("machine")]
        mline = "; ".join(machine({"machine": m}) for m in machines if m) or machine(mq)
        out += [f"**MQAR** (`bench/mqar.py`; V={mq['vocab_size']}, 2-layer models (mixer + MLP) x 2, batch "
                f"{mq['batch_size']}; each run scored on 1,000 held-out examples every {mq.get('eval_every', 250)} "
                f"steps and stopped at accuracy {mq.get('target', 0.99)}; a cell is the best run over the learning "
                "rates tried, with its training examples, lr and steps, and the accuracy per lr; cells of the "
                f"protocol's grid that were not run say so; {mline}):", "",
                "| mixer | d_model | " + " | ".join(f"({L}, {k})" for L, k in settings) + " |",
                "|---|---|" + "---|" * len(settings)]
        for mixer in dict.fromkeys(r["mixer"] for r in mq["results"]):
            for d in sorted({64, 128} | {r["d_model"] for r in mq["results"] if r["mixer"] == mixer}):
                cells = []
                for L, k in settings:
                    m = [r for r in mq["results"] if (r["mixer"], r["d_model"], r["seq_len"]) == (mixer, d, L)]
                    if not m:
                        cells.append("not run")
                        continue
                    r = m[0]
                    b = r.get("budget_per_run", {}).get(str(r["best_lr"]), {})
                    per = ", ".join(f"{float(lr):g}: {a:.3f}" for lr, a in r["per_lr"].items())
                    data = f"{r['n_train'] // 1000}k examples, " if r.get("n_train") else ""
                    other = "".join(f"; with {o['n_train'] // 1000}k examples: "
                                    + ", ".join(f"lr {float(lr):g}: {a:.3f}" for lr, a in o["per_lr"].items())
                                    for o in r.get("other_runs", []) if o.get("n_train"))
                    cells.append(f"**{r['accuracy']:.3f}** ({data}lr {r['best_lr']:g}, {b.get('steps', '?')} steps; "
                                 f"per lr {per}{other})")
                out.append(f"| {mixer} | {d} | " + " | ".join(cells) + " |")
        for m, why in mq.get("notes", {}).items():
            out.append(f"| {m} | | {why} |")
        out.append("")
    hm = load("hmt")
    if hm:
        sv, mem, rc2 = hm["shakespeare_val"], hm["memory_growth_8x_over_1x_mib"], hm["recall"]
        eq = hm.get("equal_terms")
        out += [f"**HMT** (`bench/hmt.py`{' --quick' if hm.get('mode') == 'quick' else ''}; backbone "
                f"{hm['params']['backbone']:,} params, memory +{hm['params']['hmt_pct_of_backbone']:.2f}%, "
                f"segment {hm['segment_len']}, {hm['memory'].get('n_sensory', '?')} sensory tokens; "
                + (f"both trained {eq['steps']} steps x batch {eq['batch_size']} x {eq['seq_len']} tokens = "
                   f"{eq['train_tokens_each']:,} tokens each; " if eq else "")
                + f"{machine(hm)}):", ""]
        if "plain_sliding_matched" in sv:
            pm, pt, ps, hh = (sv["plain_sliding_matched"], sv["plain_sliding_train_context"],
                              sv["plain_segment_windows"], sv["hmt_one_sequence"])
            runs = hm["runs"]
            out += ["| model, scored on Tiny Shakespeare val as one sequence "
                    f"({sv['n_tokens_scored']:,} tokens) | context per scored token | loss | eval µs/token |",
                    "|---|---|---|---|",
                    f"| HMT (segments + sensory + memory) | {hm['memory']['n_sensory']}-{hm['segment_len'] + hm['memory']['n_sensory']} tokens + memory | "
                    f"{hh['loss']:.3f} | {hh['eval_us_per_token']:.0f} |",
                    f"| plain LM, sliding window {pm['context']} stride {pm['stride']} (matched) | "
                    f"{pm['context'] - pm['stride']}-{pm['context']} tokens | {pm['loss']:.3f} | {pm['eval_us_per_token']:.0f} |",
                    f"| plain LM, sliding window {pt['context']} stride {pt['stride']} (its training context) | "
                    f"{pt['context'] - pt['stride']}-{pt['context']} tokens | {pt['loss']:.3f} | {pt['eval_us_per_token']:.0f} |",
                    f"| plain LM, non-overlapping {ps['context']}-token windows (the earlier baseline) | "
                    f"0-{ps['context']} tokens | {ps['loss']:.3f} | {ps['eval_us_per_token']:.0f} |", "",
                    "| measure | plain LM | HMT |", "|---|---|---|",
                    f"| training time per token | {runs['plain']['train_us_per_token']:.0f} µs | "
                    f"{runs['hmt']['train_us_per_token']:.0f} µs |",
                    f"| peak memory growth, 8x longer input | {mem['plain_sliding_matched']:.1f} MiB (matched sliding "
                    f"window), {mem['plain_whole_window']:.0f} MiB (whole input as one window) | {mem['hmt']:.1f} MiB |",
                    f"| recall {rc2['task']['distance_segments']} segments back (chance {rc2['task']['chance']:.3f}) | "
                    f"{rc2['no_memory']['accuracy_last_query']:.3f} (one segment at a time) | "
                    f"{rc2['hmt']['accuracy_last_query']:.3f} |", ""]
        else:
            out += ["| measure | same backbone, one segment at a time | HMT |", "|---|---|---|",
                    f"| Tiny Shakespeare val ({sv['n_tokens_scored']:,} tokens as one sequence), loss | "
                    f"{sv['plain_segment_windows']['loss']:.3f} | {sv['hmt_one_sequence']['loss']:.3f} |",
                    f"| peak memory growth, 8x longer input | {mem['plain_whole_window']:.0f} MiB (whole input as one "
                    f"window) | {mem['hmt']:.1f} MiB |",
                    f"| recall {rc2['task']['distance_segments']} segments back (chance {rc2['task']['chance']:.3f}) | "
                    f"{rc2['no_memory']['accuracy_last_query']:.3f} | {rc2['hmt']['accuracy_last_query']:.3f} |", ""]
    tk = load("tokenize")
    if tk:
        sizes = list(next(iter(tk["tokenizers"].values()))["peak_rss_mb"])
        la = ", ".join(f"{x:.1f}" for x in tk["loadavg_start"][:1] + tk["loadavg_end"][:1])
        out += [f"**Tokenization** (`bench/tokenization.py`; a {tk['corpus_mb']:.0f} MB txt file of Tiny Shakespeare "
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
    out += long_seq_tables()
    tables = "\n".join(out)
    if "--write" in sys.argv[1:]:
        write_readme(tables)
    else:
        print(tables)


def long_seq_tables() -> list[str]:
    """Activation checkpointing, document packing, CPU bf16, recursive LoRA (issue 16)."""
    out = []
    lc = load("long_context")
    if lc:
        lg, st = lc["longest"], lc["step_time"]
        out += [f"**Longest trainable context** (`bench/long_context.py`; {lc['model']}; one training step "
                f"under a {lc['cap_gib']:g} GiB RLIMIT_DATA cap, L on a sqrt(2) grid; {lc['cpu']}, "
                f"{lc['threads']} thread):", "",
                "| activation checkpointing | longest L | peak RSS there | first L refused |", "|---|---|---|---|"]
        for mode, label in (("none", "none"), ("layers", "`layers`")):
            runs = lc["runs"].get(mode, [])
            ok = [r for r in runs if r["ok"]]
            bad = [r["L"] for r in runs if not r["ok"]]
            out.append(f"| {label} | {lg.get(mode, 0):,} | {ok[-1]['peak_rss_mib']:.0f} MiB | "
                       f"{bad[0] if bad else 'none up to the grid end':} |" if ok else f"| {label} | — | — | — |")
        out += ["", f"Longest context with / without: {lc.get('ratio_longest', float('nan')):.1f}x. Step time at "
                f"L = {st['L']:,}: {st['none_s']:.1f} s plain, {st['layers_s']:.1f} s checkpointed "
                f"({st['ratio_layers_over_none']:.2f}x).", ""]
    pk = load("packing")
    if pk:
        out += [f"**Document packing** (`bench/packing.py`; training steps with `seq_idx` vs one stream on the "
                f"same windows, batch {pk['batch']} x {pk['seq_len']}, alternating; {pk['cpu']}, "
                f"{pk['threads']} thread; tokens/s):", "",
                "| boundaries | preset | stream | document | document / stream |", "|---|---|---|---|---|"]
        for k, r in pk["results"].items():
            b, preset = k.split("/")
            out.append(f"| {b} ({pk['boundaries'][b]['mean_documents_per_window']:.1f} docs/window) | `{preset}` | "
                       f"{r['stream_tok_s']:,.0f} | {r['document_tok_s']:,.0f} | {r['ratio_document_over_stream']:.2f} |")
        out.append("")
    bf = load("bf16")
    if bf:
        out += [f"**CPU bf16** (`bench/bf16.py`; d_model 512, 8 layers, batch {bf['batch']} x {bf['seq_len']}, "
                f"{bf['steps']} steps side by side; {bf['cpu']} ({', '.join(bf['cpu_bf16_flags']) or 'no bf16 flags'}), "
                f"{bf['threads']} thread; `dtype: auto` chose {bf['auto_choice']}):", "",
                "| stack | params | fp32 step | auto step | speedup | final loss fp32 | final loss auto | rel. diff |",
                "|---|---|---|---|---|---|---|---|"]
        for pat, r in bf["results"].items():
            out.append(f"| `{pat}` | {r['n_params'] / 1e6:.1f}M | {r['fp32_step_s']:.2f} s | {r['auto_step_s']:.2f} s | "
                       f"{r['speedup_auto_over_fp32']:.2f}x | {r['fp32_final_loss']:.4f} | {r['auto_final_loss']:.4f} | "
                       f"{100 * r['final_loss_rel_diff']:+.2f}% |")
        out.append("")
    rl = load("recursive_lowrank")
    if rl:
        out += [f"**Recursive LoRA: merged vs factored** (`bench/recursive_lowrank.py`; one Linear, rank "
                f"{rl['rank']}, forward+backward, {rl['threads']} thread):", "",
                "| tokens | in x out | merged | factored | factored / merged |", "|---|---|---|---|---|"]
        for r in rl["results"]:
            out.append(f"| {r['tokens']:,} | {r['in']} x {r['out']} | {r['merged_ms']:.2f} ms | "
                       f"{r['factored_ms']:.2f} ms | {r['factored_over_merged']:.2f} |")
        out.append("")
    return out


if __name__ == "__main__":
    main()
