"""Text sources: expand file globs and directories into data files, read their documents.

Data files: ``.txt`` (UTF-8 text), ``.jsonl`` (one JSON object per line), ``.parquet`` and
``.arrow`` (Arrow IPC file or stream format) with the text in the field ``text_field``. A
directory stands for its data files: a Hugging Face dataset saved with ``save_to_disk`` (its
``state.json`` lists the Arrow shards; a ``DatasetDict`` directory means its ``train`` split),
or any directory of data files (all of them, recursively, sorted). Arrow and parquet are read
in place (memory-mapped / streamed by record batch), never copied into an Arrow cache.

Documents: a ``.txt`` file is one document, a jsonl / parquet / arrow record is one document;
with a ``separator`` (``data.doc_separator``) each of those is split further after every
occurrence of the separator (left to right, not overlapping; the separator stays at the end of
the document it ends; documents of only whitespace are dropped). E.g. ``"\\n\\n"``: blank-line
paragraphs. Every error names the file (and the record where there is one).
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

SUPPORTED = (".txt", ".jsonl", ".parquet", ".arrow")
# the source checkout seqlm runs from (holds data/ and tokenizers/), or None for an installed
# (non-editable) package: relative paths that do not exist from the current directory are
# looked up there too, so `seqlm train` works from any directory of a checkout


def _source_checkout() -> "Path | None":
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    try:
        ok = pyproject.is_file() and 'name = "seqlm"' in pyproject.read_text()
    except (OSError, UnicodeDecodeError):
        ok = False
    return root if ok else None


PROJECT_ROOT = _source_checkout()

PathLike = Union[str, os.PathLike]


def resolve_path(path: PathLike) -> Path:
    """``path`` as given if it exists, else relative to the project root if it exists there."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and PROJECT_ROOT is not None and (PROJECT_ROOT / p).exists():
        return PROJECT_ROOT / p
    return p


def expand_files(patterns: Sequence[PathLike], field: str = "data.files") -> list[Path]:
    """Expand globs (``**`` allowed) and directories, keep the listed order, drop duplicates;
    check each file exists and has a supported extension."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    for pat in patterns:
        pat = str(pat)
        if glob.has_magic(pat):
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits and not Path(pat).is_absolute() and PROJECT_ROOT is not None:
                hits = sorted(glob.glob(str(PROJECT_ROOT / pat), recursive=True))
            paths = []
            for h in hits:
                paths += [Path(h)] if os.path.isfile(h) else expand_dir(Path(h), field) if os.path.isdir(h) else []
            if not paths:
                raise FileNotFoundError(f"{field}: pattern {pat!r} matches no file")
        else:
            p = resolve_path(pat)
            if not p.exists():
                where = "" if PROJECT_ROOT is not None or Path(pat).is_absolute() else (
                    " (relative to the current directory: this seqlm is an installed package, not a "
                    "source checkout, so the repository's data/ is not looked up)")
                raise FileNotFoundError(f"{field}: file {pat!r} not found{where}")
            paths = expand_dir(p, field) if p.is_dir() else [p]
            if not p.is_dir() and not p.is_file():
                raise ValueError(f"{field}: {pat!r} is not a file")
        for p in paths:
            if p.suffix.lower() not in SUPPORTED:
                raise ValueError(f"{field}: file {str(p)!r} has unsupported extension "
                                 f"{p.suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
            p = p.resolve()
            if p not in out:
                out.append(p)
    return out


def expand_dir(d: Path, field: str = "data.files") -> list[Path]:
    """The data files a directory stands for (see the module doc)."""
    if (d / "dataset_dict.json").is_file():  # a DatasetDict: its train split
        try:
            splits = json.loads((d / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{field}: {str(d)!r}: unreadable dataset_dict.json ({e})") from None
        if "train" not in splits:
            raise ValueError(f"{field}: {str(d)!r} is a DatasetDict without a train split (splits: "
                             f"{splits}); give the split's directory, e.g. {str(d / splits[0])!r}")
        d = d / "train"
    if (d / "state.json").is_file():  # Dataset.save_to_disk: the shards state.json lists
        try:
            names = [f["filename"] for f in json.loads((d / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{field}: {str(d)!r}: unreadable state.json of a saved dataset ({e})") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing or not names:
            raise FileNotFoundError(f"{field}: saved dataset {str(d)!r} lacks its shard(s) {missing or names}")
        return [d / n for n in names]
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
                   and not any(part.startswith(".") for part in p.relative_to(d).parts))
    if not files:
        raise FileNotFoundError(f"{field}: directory {str(d)!r} holds no data file ({', '.join(SUPPORTED)})")
    return files


def iter_texts(path: PathLike, text_field: str = "text") -> Iterator[str]:
    """All the text of one file in pieces of bounded size (for fitting a char vocabulary)."""
    from seqlm.data.readers import plan_chunks, read_chunk

    for chunk in plan_chunks(Path(path), text_field, None, "utf8"):
        for text, _, _ in read_chunk(chunk, text_field, None):
            yield text


def iter_documents(path: PathLike, text_field: str = "text", separator: Optional[str] = None) -> Iterator[str]:
    """Yield the documents of one file (see the module doc); errors name the file."""
    from seqlm.data.readers import plan_chunks, read_chunk

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} not found")
    parts: list[str] = []
    for chunk in plan_chunks(p, text_field, separator, None):
        for text, starts, ends in read_chunk(chunk, text_field, separator):
            if starts and parts:
                yield "".join(parts)
                parts = []
            parts.append(text)
            if ends:
                yield "".join(parts)
                parts = []
    if parts:
        yield "".join(parts)
