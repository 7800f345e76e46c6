"""``seqlm`` command line: one subcommand family per module, each module exposing
``add_commands(subparsers)`` that registers its parsers with ``set_defaults(func=...)``."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules contributing subcommands (train, tokenizer, eval, generate, convert)
COMMAND_MODULES = [
    "seqlm.train.cli",
    "seqlm.data.cli",
    "seqlm.eval.cli",
    "seqlm.convert",
    "seqlm.distill.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqlm", description="Long-sequence language modeling.")
    # `deepspeed --module seqlm.cli ...` puts --local_rank=N before the command (LOCAL_RANK is in the env too)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from seqlm.cpualloc import apply_entry_point

    apply_entry_point()  # an entry point: tune the CPU allocator (SEQLM_CPU_ALLOC=0 opts out)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # pass-through commands (lm-eval) take the rest
    if extra:
        if not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough_args = extra
    return run_command(args)


def run_command(args) -> int:
    """Run a parsed command; known user errors (bad config, checkpoint, data, I/O) become one
    message on stderr and exit code 2; a second Ctrl-C exits 130."""
    from seqlm.config import ConfigError

    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"seqlm: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # CheckpointError, NonFiniteLossError, data errors, disk full
        msg = str(e) if not isinstance(e, OSError) or not e.strerror else \
            f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
        print(f"seqlm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqlm: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
