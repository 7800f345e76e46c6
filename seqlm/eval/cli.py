"""``seqlm eval ...`` and ``seqlm generate``.

    seqlm eval ppl --checkpoint C --data FILES --context 512,2048,8192 [--stride S]
    seqlm generate --checkpoint C --prompt TEXT | --prompt-file F --max-new-tokens N ...

Task evaluations (``seqlm eval mqar|passkey|needle|phonebook``) are added by
:mod:`seqlm.eval.tasks.cli` when it is present.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_contexts(text: str) -> list:
    """``"512,2048,full"`` -> [512, 2048, None]; clear error naming --context."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("full", "none", "all"):
            out.append(None)
            continue
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"--context: {part!r} is not an integer or 'full'") from None
        if v < 1:
            raise ValueError(f"--context: must be >= 1, got {v}")
        out.append(v)
    if not out:
        raise ValueError("--context: give at least one context length")
    return out


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(args) -> None:
    """``--threads N``: torch's intra-op threads for this command (on a busy machine one
    thread can be many times faster than the default of one per core)."""
    n = getattr(args, "threads", None)
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads: must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def run_name(checkpoint) -> str:
    """A checkpoint's name for titles: its run directory when the folder is ``checkpoint``."""
    p = Path(checkpoint).resolve()
    return p.parent.name if p.name == "checkpoint" and p.parent.name else p.name


def run_ppl(args) -> int:
    from seqlm.data.sources import expand_files, iter_documents
    from seqlm.eval.perplexity import evaluate_perplexity, plot_curves
    from seqlm.io.pretrained import load_any as load_model

    set_threads(args)
    contexts = parse_contexts(args.context)
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride: must be >= 1, got {args.stride}")
    model, cfg, tok = load_model(args.checkpoint, _device(args.device))
    files = expand_files(args.data, field="--data")
    texts = []
    for f in files:
        texts.extend(t for t in iter_documents(f, args.text_field) if t)
    if args.max_chars:
        texts = [t[:args.max_chars] for t in texts]
    if not texts:
        raise ValueError(f"--data: no text found in {', '.join(map(str, files))}")
    if args.join:
        texts = ["\n".join(texts)]
    t0 = time.time()
    res = evaluate_perplexity(model, tok, texts, contexts, args.stride, args.batch_size, args.chunk,
                              progress=not args.quiet, pack=args.pack)
    res.update(checkpoint=str(args.checkpoint), files=[str(f) for f in files], wall_s=time.time() - t0)
    for name, r in res["contexts"].items():
        bpb = r["bits_per_byte"]
        print(f"context {name:>6}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  "
              f"bits/byte {bpb:.4f}  tokens {r['n_tokens']:,}" if bpb is not None else
              f"context {name:>6}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(res, indent=1))
    plot_curves(res, out / "ppl_curve.png", title=f"{run_name(args.checkpoint)}: loss vs position")
    print(f"wrote {out / 'ppl.json'} and {out / 'ppl_curve.png'}", file=sys.stderr)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in res["contexts"].items()}))
    return 0


def run_generate(args) -> int:
    import torch

    from seqlm.io.pretrained import load_any as load_model

    set_threads(args)
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt or --prompt-file")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k: must be >= 1, got {args.top_k}")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    model, cfg, tok = load_model(args.checkpoint, _device(args.device))
    ids = list(tok.encode(prompt)) if prompt else []
    if not ids:
        ids = [tok.eos_id]
    prompt_ids = torch.tensor(ids, dtype=torch.long)

    # stream: decode the growing sequence and print the new suffix (multi-byte tokens stay whole)
    produced: list[int] = []
    shown = [""]

    def on_token(t):
        produced.append(int(t[0]))
        text = tok.decode(produced)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    if not args.quiet:
        sys.stdout.write(prompt)
    t0 = time.perf_counter()
    new = model.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id if args.stop_at_eos else None,
                         on_token=on_token, compile=args.compile)
    dt = time.perf_counter() - t0
    final = tok.decode(produced)
    sys.stdout.write(final[len(shown[0]):] + "\n")
    n = int(new.numel())
    print(f"[{n} tokens in {dt:.2f}s: {n / max(dt, 1e-9):.1f} tokens/s, prompt {len(ids)} tokens]", file=sys.stderr)
    return 0


def run_lm_eval(args) -> int:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("lm-eval is not installed: pip install -e '.[lmeval]'")
    from seqlm.eval.lm_eval_adapter import main

    return main(getattr(args, "passthrough_args", []))


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint: perplexity and long-context tasks")
    esub = ev.add_subparsers(dest="eval_command", metavar="TASK")
    esub.required = True

    p = esub.add_parser("ppl", help="sliding-window perplexity (every token scored once)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help=".txt/.jsonl/.parquet files or globs")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet records")
    p.add_argument("--context", default="512", help="comma-separated context lengths, or 'full'")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: half the context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk", type=int, default=2048, help="tokens per model call inside long windows")
    p.add_argument("--join", action="store_true", help="score all documents as one sequence")
    p.add_argument("--pack", action="store_true", help="pack short documents several to a window with "
                   "their boundaries (seq_idx): same scores as one per window, less padding")
    p.add_argument("--max-chars", type=int, default=None, help="truncate each document (quick checks)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.set_defaults(func=run_ppl)

    import importlib.util

    if importlib.util.find_spec("seqlm.eval.tasks") and importlib.util.find_spec("seqlm.eval.tasks.cli"):
        from seqlm.eval.tasks.cli import add_task_commands

        add_task_commands(esub)

    le = sub.add_parser("lm-eval", help="lm-evaluation-harness with the seqlm model registered "
                        "(all arguments go to lm-eval: --model seqlm --model_args checkpoint=DIR --tasks ...)",
                        add_help=False)
    le.set_defaults(func=run_lm_eval, passthrough=True)

    g = sub.add_parser("generate", help="generate text from a checkpoint, streaming to stdout")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-at-eos", action="store_true", help="stop when the model emits EOS")
    g.add_argument("--device", default="auto")
    g.add_argument("--quiet", action="store_true", help="do not echo the prompt")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: a one-off compile (tens of seconds), then "
                   "faster steps; worth it for long generations")
    g.set_defaults(func=run_generate)
