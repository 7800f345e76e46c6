"""``seqlm eval mqar|passkey|needle|phonebook`` (registered by seqlm.eval.cli via
:func:`add_task_commands`). Each evaluates a checkpoint and writes <task>.json + <task>.png
into --out (default CHECKPOINT/eval)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _ints(text: str, field: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"{field}: give positive integers, got {text!r}")
    return out


def _floats(text: str, field: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated numbers, got {text!r}") from None
    if not out or min(out) < 0 or max(out) > 1:
        raise ValueError(f"{field}: depths must be in [0, 1], got {text!r}")
    return out


def run_name(checkpoint) -> str:
    from seqlm.eval.cli import run_name as name

    return name(checkpoint)


def _load(args):
    from seqlm.eval.cli import _device, set_threads
    from seqlm.io.pretrained import load_any as load_model

    set_threads(args)
    model, cfg, tok = load_model(args.checkpoint, _device(args.device))
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    return model, tok, out


def _finish(res: dict, out: Path, task: str) -> int:
    print(f"wrote {out / (task + '.json')} and {out / (task + '.png')}", file=sys.stderr)
    keep = {k: v for k, v in res.items() if k not in ("cells", "rows")}
    print(json.dumps(keep))
    return 0


def run_mqar(args) -> int:
    from seqlm.eval.tasks.common import plot_curve, write_json
    from seqlm.eval.tasks.mqar import MQARSpec, evaluate_mqar
    from seqlm.eval.cli import _device, set_threads
    from seqlm.io.pretrained import load_any as load_model

    set_threads(args)
    model, cfg, tok = load_model(args.checkpoint, _device(args.device))
    V = args.vocab_size or model.vocab_size
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    settings = [tuple(_ints(s, "--settings")) for s in args.settings.split(";")]
    rows = []
    for s in settings:
        if len(s) != 2:
            raise ValueError(f"--settings: each setting is L,k (e.g. 64,4;128,8), got {s}")
        r = evaluate_mqar(model, MQARSpec(s[0], s[1], V), args.num_examples, args.seed)
        rows.append({"seq_len": s[0], "num_pairs": s[1], "accuracy": r["accuracy"], "n_queries": r["n_queries"]})
        print(f"MQAR L={s[0]} k={s[1]}: accuracy {r['accuracy']:.4f}", file=sys.stderr)
    res = {"task": "mqar", "vocab_size": V, "checkpoint": str(args.checkpoint), "rows": rows,
           "accuracy": [r["accuracy"] for r in rows]}
    write_json(out / "mqar.json", res)
    plot_curve([r["seq_len"] for r in rows], res["accuracy"], out / "mqar.png", "MQAR accuracy", "sequence length")
    return _finish(res, out, "mqar")


def run_passkey(args) -> int:
    from seqlm.eval.tasks.passkey import evaluate_passkey

    model, tok, out = _load(args)
    res = evaluate_passkey(model, tok, _ints(args.lengths, "--lengths"), _floats(args.depths, "--depths"),
                           args.n, args.seed, out, key_chars=args.key_chars, title=run_name(args.checkpoint))
    return _finish(res, out, "passkey")


def run_needle(args) -> int:
    from seqlm.eval.tasks.needle import evaluate_needle

    model, tok, out = _load(args)
    res = evaluate_needle(model, tok, _ints(args.lengths, "--lengths"), _floats(args.depths, "--depths"),
                          args.n, args.seed, args.haystack, out, title=run_name(args.checkpoint))
    return _finish(res, out, "needle")


def run_phonebook(args) -> int:
    from seqlm.eval.tasks.phonebook import evaluate_phonebook

    model, tok, out = _load(args)
    res = evaluate_phonebook(model, tok, _ints(args.sizes, "--sizes"), args.n, args.seed, out,
                             title=run_name(args.checkpoint))
    return _finish(res, out, "phonebook")


def _common(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")


def add_task_commands(esub) -> None:
    """Add the task subparsers to ``seqlm eval``'s subparsers."""
    p = esub.add_parser("mqar", help="multi-query associative recall accuracy (Zoology)")
    _common(p)
    p.add_argument("--settings", default="64,4;128,8;256,16;512,64", help="L,k pairs separated by ';'")
    p.add_argument("--vocab-size", type=int, default=None, help="MQAR vocabulary (default: the model's)")
    p.add_argument("--num-examples", type=int, default=1000)
    p.set_defaults(func=run_mqar)

    for name, fn, help_ in (("passkey", run_passkey, "pass key in filler text: length x depth heatmap"),
                            ("needle", run_needle, "needle in a real-text haystack: length x depth heatmap")):
        p = esub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--lengths", default="256,512,1024", help="prompt lengths in tokens")
        p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="insertion depths in [0, 1]")
        p.add_argument("--n", type=int, default=5, help="examples per cell")
        if name == "passkey":
            p.add_argument("--key-chars", default="0123456789", help="characters of the 5-character key")
        else:
            p.add_argument("--haystack", default="data/tinyshakespeare.txt", help="haystack text file")
        p.set_defaults(func=fn)

    p = esub.add_parser("phonebook", help="phonebook lookup accuracy vs number of entries")
    _common(p)
    p.add_argument("--sizes", default="4,8,16,32,64", help="numbers of entries")
    p.add_argument("--n", type=int, default=10, help="examples per size")
    p.set_defaults(func=run_phonebook)
