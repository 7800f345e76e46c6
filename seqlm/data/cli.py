"""``seqlm tokenizer ...``: train a SentencePiece model, inspect a tokenizer, encode, decode.

    seqlm tokenizer train --input data/tinyshakespeare.txt --vocab-size 2048 --type bpe \\
        --out tokenizers/shakespeare-bpe2048.model
    seqlm tokenizer info   --tokenizer tokenizers/shakespeare-bpe2048.model
    seqlm tokenizer encode --tokenizer runs/default/checkpoint "To be, or not to be"
    seqlm tokenizer decode --tokenizer runs/default/checkpoint 12 40 7

``--tokenizer`` takes ``byte``, a sentencepiece ``.model`` file, a saved tokenizer directory
(with tokenizer.json) or a checkpoint directory (its ``tokenizer/``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def resolve_tokenizer(spec: str):
    from seqlm.data.sources import resolve_path
    from seqlm.data.tokenizers import ByteTokenizer, load_tokenizer

    if spec == "byte":
        return ByteTokenizer()
    p = resolve_path(spec)
    if p.is_dir() and not (p / "tokenizer.json").exists() and not (p / "tokenizer").exists():
        from seqlm.io.checkpoint import find_checkpoint  # a checkpoint root: its latest step

        p = find_checkpoint(p) or p
    if p.is_dir() and not (p / "tokenizer.json").exists() and (p / "tokenizer" / "tokenizer.json").exists():
        p = p / "tokenizer"
    if not p.exists():
        raise FileNotFoundError(f"--tokenizer: {spec!r} not found")
    return load_tokenizer(p)


def run_train(args) -> int:
    from seqlm.data.tokenizers import train_sentencepiece

    t0 = time.perf_counter()
    tok = train_sentencepiece(args.input, args.vocab_size, args.type, args.out, text_field=args.text_field,
                              character_coverage=args.character_coverage,
                              byte_fallback=not args.no_byte_fallback, max_sentences=args.max_sentences,
                              num_threads=args.threads)
    print(f"wrote {args.out}: {args.type} vocab {tok.vocab_size}, eos id {tok.eos_id}, "
          f"fingerprint {tok.fingerprint()[:16]} ({time.perf_counter() - t0:.1f}s)")
    return 0


def run_info(args) -> int:
    tok = resolve_tokenizer(args.tokenizer)
    print(json.dumps({"type": tok.type, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "fingerprint": tok.fingerprint()}, indent=2))
    return 0


def run_encode(args) -> int:
    tok = resolve_tokenizer(args.tokenizer)
    if args.file is not None:
        text = Path(args.file).read_text(encoding="utf-8")
    elif args.text is not None:
        text = args.text
    else:
        text = sys.stdin.read()
    ids = tok.encode(text)
    if args.pieces and hasattr(tok, "id_to_piece"):
        print(" ".join(tok.id_to_piece(i) for i in ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def run_decode(args) -> int:
    tok = resolve_tokenizer(args.tokenizer)
    raw = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        raise ValueError(f"ids: expected integers ({e})") from None
    sys.stdout.write(tok.decode(ids))
    sys.stdout.write("\n")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("tokenizer", help="train / inspect tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True

    t = tsub.add_parser("train", help="train a SentencePiece BPE/unigram model on local files")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt/.jsonl/.parquet files or globs; each line of each document is a sentence")
    t.add_argument("--vocab-size", type=int, required=True, help="number of pieces (incl. 256 byte pieces)")
    t.add_argument("--type", choices=["bpe", "unigram"], default="bpe", help="model type (default bpe)")
    t.add_argument("--out", required=True, help="output .model path (written atomically)")
    t.add_argument("--text-field", default="text", help="record field of jsonl/parquet inputs")
    t.add_argument("--character-coverage", type=float, default=1.0,
                   help="fraction of characters covered by pieces (rest via byte fallback)")
    t.add_argument("--no-byte-fallback", action="store_true",
                   help="map unknown characters to <unk> instead of UTF-8 byte pieces")
    t.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="sample at most this many lines for training (0: all)")
    t.add_argument("--threads", type=int, default=1,
                   help="trainer threads (default 1; the model file records it, so the same command "
                        "reproduces the same bytes only with the same count)")
    t.set_defaults(func=run_train)

    i = tsub.add_parser("info", help="print a tokenizer's type, vocab size, EOS id and fingerprint")
    i.add_argument("--tokenizer", "-t", required=True, help="byte | .model | tokenizer dir | checkpoint dir")
    i.set_defaults(func=run_info)

    e = tsub.add_parser("encode", help="print the ids of a text")
    e.add_argument("--tokenizer", "-t", required=True, help="byte | .model | tokenizer dir | checkpoint dir")
    e.add_argument("text", nargs="?", default=None, help="text (default: stdin)")
    e.add_argument("--file", default=None, help="encode this file's contents")
    e.add_argument("--pieces", action="store_true", help="print sentencepiece pieces instead of ids")
    e.set_defaults(func=run_encode)

    d = tsub.add_parser("decode", help="print the text of ids")
    d.add_argument("--tokenizer", "-t", required=True, help="byte | .model | tokenizer dir | checkpoint dir")
    d.add_argument("ids", nargs="*", help="ids (default: whitespace-separated on stdin)")
    d.set_defaults(func=run_decode)
