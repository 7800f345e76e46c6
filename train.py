#!/usr/bin/env python
"""Train a seqlm model: ``python train.py [--config configs/X.yaml] [key=value ...]``.

With no arguments: trains configs/default.yaml on the bundled Tiny Shakespeare corpus,
then prints validation loss, perplexity and a generated sample.
"""
import argparse
import sys

from seqlm.cli import run_command
from seqlm.train.cli import add_train_args, run_train


def main(argv=None) -> int:
    from seqlm.cpualloc import apply_entry_point

    apply_entry_point()  # an entry point: tune the CPU allocator (SEQLM_CPU_ALLOC=0 opts out)
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    add_train_args(p)
    args = p.parse_args(argv)
    args.func = run_train
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
