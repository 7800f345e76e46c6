#!/usr/bin/env python
"""Render the config reference (every field of every section and block) from the pydantic
schema into README.md between the CONFIG-REFERENCE markers.

    python scripts/gen_config_docs.py          # rewrite README.md
    python scripts/gen_config_docs.py --check  # exit 1 if README.md is out of date (tests use it)
"""
from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- CONFIG-REFERENCE:BEGIN -->", "<!-- CONFIG-REFERENCE:END -->"


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in args)}]"
    if origin is dict:
        return "mapping"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            val = field.default_factory()
        except TypeError:
            return "…"
        if isinstance(val, BaseModel):
            return "(section)"
        return f"`{val}`"
    if field.is_required():
        return "required"
    return f"`{field.default!r}`".replace("None", "null")


def _table(model: type[BaseModel], prefix: str, out: list[str], nested: list) -> None:
    out.append("| field | type | default | description |")
    out.append("|---|---|---|---|")
    for name, f in model.model_fields.items():
        ann = f.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        item = ""
        for a in typing.get_args(ann):
            if isinstance(a, type) and issubclass(a, BaseModel) and name not in ("layers",):
                sub = a
            for b in typing.get_args(a) if typing.get_origin(a) is list else ():  # list of sections
                if isinstance(b, type) and issubclass(b, BaseModel) and name not in ("layers",):
                    sub, item = b, "[i]"
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        if name == "type" and typing.get_origin(ann) is typing.Literal and len(typing.get_args(ann)) == 1:
            desc = desc or "Block type tag."
        out.append(f"| `{prefix}{name}` | {_type_name(ann)} | {_default(f)} | {desc} |")
        if sub is not None:
            nested.append((sub, f"{prefix}{name}{item}."))


def render() -> str:
    from seqlm import registry
    from seqlm.config import RunConfig

    out: list[str] = []
    for sec_name, f in RunConfig.model_fields.items():
        ann = f.annotation
        cls = ann if isinstance(ann, type) else next(a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel))
        out.append(f"### `{sec_name}`\n")
        out.append((cls.__doc__ or "").strip().splitlines()[0] + "\n")
        nested: list = []
        _table(cls, "", out, nested)
        while nested:
            sub, pre = nested.pop(0)
            out.append(f"\n`{pre.rstrip('.')}`: {(sub.__doc__ or '').strip().splitlines()[0] if sub.__doc__ else ''}\n")
            _table(sub, pre, out, nested)
        out.append("")
    out.append("### Layer types (`model.layers[i]`, `model.block_defaults.<type>`)\n")
    chars = {v: k for k, v in registry.pattern_chars().items()}
    out.append("| pattern char | type | block |\n|---|---|---|")
    for name, cls in sorted(registry.blocks().items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        out.append(f"| `{chars.get(name, '')}` | `{name}` | {doc[0] if doc else ''} |")
    out.append("")
    for name, cls in sorted(registry.blocks().items()):
        out.append(f"#### `{name}`\n")
        _table(cls.Config, "", out, [])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the {BEGIN} / {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if args.check:
        if new != text:
            print("README.md config reference is out of date: run python scripts/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
