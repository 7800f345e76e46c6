#!/usr/bin/env python
"""Whole imported models: seqlm vs transformers, forward time and greedy generation speed.

For each architecture seqlm imports (Llama, GPT-2, GPT-NeoX, Mamba, Mamba-2, Nemotron-H) a
few-million-parameter random model is built with transformers' own classes (no hub access),
saved, and imported with ``seqlm.load``; then, at each context length L (batch 1, fp32, same
random token ids for both):

- forward: median wall time of ``--repeats`` no-grad forwards over L tokens (after one warm-up),
  the two implementations alternating so machine noise hits both alike; the logits must agree
  (max |diff| / max |logits| <= 1e-4: fp32 rounding grows with L and with the logit scale of
  these random models, initializer_range 0.1, chosen so greedy tokens are not near-ties; RoPE
  models at long L differ more because transformers computes the rotation angles pos * freq in
  fp32, off by up to half an ulp of the angle, ~5e-4 rad at position 8192, while seqlm computes
  them in float64);
- generation: a prompt of L tokens, then ``--new`` greedy tokens with caches (transformers'
  ``generate(do_sample=False)`` vs seqlm's ``LM.generate(temperature=0)``): total time
  (prefill + decode), and decode tokens/s timed from the first to the last new token (a
  streamer / on_token callback stamps each); the tokens must match.

For Mamba and Mamba-2 this is the whole-model version of bench/hf_compare.py (which times single
mixers forward+backward). Without mamba-ssm / causal-conv1d, transformers runs its PyTorch
fallbacks (Mamba-1: a Python loop over the tokens in forward; Mamba-2: a chunked einsum SSD).

Prints one JSON object and writes bench/results/hf_models.json (CPU model, threads, versions).

    nice -n 10 python bench/hf_models.py                     # L = 1024, 8192
    nice -n 10 python bench/hf_models.py --contexts 256 --archs llama,mamba2 --repeats 1
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): run as a script, this folder is
# sys.path[0] and would shadow them (linecache imports tokenize), so take it off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json
import os
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

V, D, TOL = 4096, 256, 1e-4  # TOL: max |logits diff| relative to max |logits|


def hf_model(arch: str, max_ctx: int):
    import transformers as T

    c = dict(vocab_size=V, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.1)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=D, intermediate_size=688, num_hidden_layers=4,
                                                num_attention_heads=8, num_key_value_heads=4,
                                                max_position_embeddings=max_ctx, **c))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_layer=4, n_head=8, n_positions=max_ctx, resid_pdrop=0,
                                              embd_pdrop=0, attn_pdrop=0, **c))
    if arch == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=D, intermediate_size=1024, num_hidden_layers=4,
                                                    num_attention_heads=8, rotary_pct=0.25,
                                                    max_position_embeddings=max_ctx, hidden_dropout=0,
                                                    attention_dropout=0, **c))
    if arch == "mamba":
        return T.MambaForCausalLM(T.MambaConfig(hidden_size=D, state_size=16, num_hidden_layers=4, expand=2, **c))
    if arch == "mamba2":
        return T.Mamba2ForCausalLM(T.Mamba2Config(hidden_size=D, state_size=64, num_hidden_layers=4, expand=2,
                                                  num_heads=8, head_dim=64, n_groups=1, chunk_size=64, **c))
    if arch == "nemotron_h":
        return T.NemotronHForCausalLM(T.NemotronHConfig(
            hidden_size=D, layers_block_type=["mamba", "mlp", "attention", "mlp", "mamba", "mlp"],
            num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=688, ssm_state_size=64,
            mamba_num_heads=8, mamba_head_dim=64, n_groups=1, chunk_size=64, **c))
    raise ValueError(f"--archs: unknown {arch!r}")


class Clock:
    """Timestamps each generated token (a transformers streamer / seqlm on_token callback):
    decode speed = tokens after the first / time from the first to the last, so the prefill
    (the first token's cost) is left out for both."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def rate(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def bench_arch(arch: str, contexts: list[int], repeats: int, new: int, tmp: Path) -> dict:
    from seqlm.config import parse_config
    from seqlm.io.factory import build_model
    from seqlm.io.hf import to_seqlm_state

    torch.manual_seed(0)
    hf = hf_model(arch, max(contexts) + new).eval()
    d = tmp / arch
    hf.save_pretrained(str(d))
    # the converter seqlm.load / seqlm convert from-hf use, without a tokenizer (the bench feeds ids)
    _, mcfg, sd = to_seqlm_state(d)
    ours = build_model(parse_config({"model": mcfg}), V)
    ours.load_state_dict(sd)
    ours.eval()
    n_params = ours.num_params()
    rows = {}
    for L in contexts:
        g = torch.Generator().manual_seed(L)
        ids = torch.randint(1, V, (1, L), generator=g)
        with torch.no_grad():
            a = hf(ids).logits                     # warm-up + equality check
            b, _ = ours(ids)
            diff = (a - b).abs().max().item()
            scale = a.abs().max().item()
            del a, b
            t_hf, t_ours = [], []
            for _ in range(repeats):
                t_hf.append(timed(lambda: hf(ids).logits)[0])
                t_ours.append(timed(lambda: ours(ids))[0])
            f_hf, f_ours = statistics.median(t_hf), statistics.median(t_ours)
            hf.generation_config.eos_token_id = None
            hf_clock, our_clock = Clock(), Clock()
            g_hf, want = timed(lambda: hf.generate(ids, max_new_tokens=new, do_sample=False, use_cache=True,
                                                   pad_token_id=0, streamer=hf_clock)[0, L:])
            g_ours, got = timed(lambda: ours.generate(ids[0], new, temperature=0.0, on_token=our_clock.put))
            hf_clock.times = hf_clock.times[1:]  # transformers' streamer first receives the prompt
        rows[str(L)] = {
            "logits_max_abs_diff": diff, "logits_max_abs": scale, "logits_match": diff <= TOL * scale,
            "forward_s": {"transformers": f_hf, "seqlm": f_ours}, "forward_speedup": f_hf / f_ours,
            "generate_s": {"transformers": g_hf, "seqlm": g_ours},
            "decode_tokens_per_s": {"transformers": hf_clock.rate(), "seqlm": our_clock.rate()},
            "generate_speedup": g_hf / g_ours, "tokens_match": got.tolist() == want.tolist(),
        }
        print(f"{arch:>10} L={L:>5}: diff {diff:.1e} (of {scale:.1f})  forward hf {f_hf:.3f}s seqlm {f_ours:.3f}s "
              f"(x{f_hf / f_ours:.2f})  generate hf {g_hf:.2f}s seqlm {g_ours:.2f}s (x{g_hf / g_ours:.2f}) "
              f"tokens {'equal' if rows[str(L)]['tokens_match'] else 'DIFFER'}", file=sys.stderr, flush=True)
    return {"n_params": n_params, "layers": "".join({"attention": "*", "mlp": "-", "mamba": "M", "mamba2": "2"}[
        s.type] for s in ours.cfg.layers), "contexts": rows}


def table(res: dict) -> str:
    """The README table of a results file."""
    lines = [f"Machine: {res['cpu']}, {res['threads']} thread(s), torch {res['torch']}, transformers "
             f"{res['transformers']}; median of {res['repeats']} forwards; {res['new_tokens']} new tokens.", "",
             "| model | params | layers | L | forward transformers | forward seqlm | speedup | generate transformers "
             "| generate seqlm | speedup | decode tok/s transformers | decode tok/s seqlm | logits diff (of max) "
             "| tokens equal |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, r in res["results"].items():
        for L, c in r["contexts"].items():
            f, g = c["forward_s"], c["generate_s"]
            lines.append(f"| {arch} | {r['n_params'] / 1e6:.1f}M | `{r['layers']}` | {L} | {f['transformers']:.2f} s | "
                         f"{f['seqlm']:.2f} s | {c['forward_speedup']:.2f}x | {g['transformers']:.2f} s | "
                         f"{g['seqlm']:.2f} s | {c['generate_speedup']:.2f}x | {c['decode_tokens_per_s']['transformers']:.1f} | "
                         f"{c['decode_tokens_per_s']['seqlm']:.1f} | {c['logits_max_abs_diff']:.1e} "
                         f"(of {c.get('logits_max_abs', float('nan')):.0f}) | {'yes' if c['tokens_match'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="llama,gpt2,gpt_neox,mamba,mamba2,nemotron_h")
    ap.add_argument("--contexts", default="1024,8192", help="comma-separated prompt / forward lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=32, help="greedy tokens generated after the prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hf_models.json")
    ap.add_argument("--table", type=Path, default=None, help="print the README table of this results file and exit")
    a = ap.parse_args(argv)
    if a.table is not None:
        print(table(json.loads(a.table.read_text())))
        return 0
    torch.set_num_threads(a.threads)
    import transformers

    contexts = [int(x) for x in a.contexts.split(",")]
    res = {"bench": "hf_models", "cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": "float32", "batch": 1, "d_model": D, "vocab": V,
           "repeats": a.repeats, "new_tokens": a.new, "contexts": contexts, "tolerance": TOL, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.archs.split(","):
            res["results"][arch] = bench_arch(arch, contexts, a.repeats, a.new, Path(tmp))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    ok = all(r["logits_match"] and r["tokens_match"] for v in res["results"].values() for r in v["contexts"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
