"""Text sources: expand file globs and read documents from local ``.txt``, ``.jsonl`` and
``.parquet`` files.

A ``.txt`` file is one document; a ``.jsonl`` / ``.parquet`` file holds one document per
record, in the field ``text_field``. jsonl and parquet go through Hugging Face ``datasets``
with local paths only (offline; the Arrow cache lives in a temp dir that is removed after
reading, so an edited file is never served from a stale Arrow cache). Every error names the
file (and the record or field where there is one).
"""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

SUPPORTED = (".txt", ".jsonl", ".parquet")
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
    """Expand globs (``**`` allowed), keep the listed order, drop duplicates; check each file
    exists and has a supported extension."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    for pat in patterns:
        pat = str(pat)
        if glob.has_magic(pat):
            hits = [h for h in glob.glob(pat, recursive=True) if os.path.isfile(h)]
            if not hits and not Path(pat).is_absolute() and PROJECT_ROOT is not None:
                hits = [h for h in glob.glob(str(PROJECT_ROOT / pat), recursive=True) if os.path.isfile(h)]
            hits.sort()
            if not hits:
                raise FileNotFoundError(f"{field}: pattern {pat!r} matches no file")
            paths = [Path(h) for h in hits]
        else:
            p = resolve_path(pat)
            if not p.exists():
                where = "" if PROJECT_ROOT is not None or Path(pat).is_absolute() else (
                    " (relative to the current directory: this seqlm is an installed package, not a "
                    "source checkout, so the repository's data/ is not looked up)")
                raise FileNotFoundError(f"{field}: file {pat!r} not found{where}")
            if not p.is_file():
                raise ValueError(f"{field}: {pat!r} is not a file")
            paths = [p]
        for p in paths:
            if p.suffix.lower() not in SUPPORTED:
                raise ValueError(f"{field}: file {str(p)!r} has unsupported extension "
                                 f"{p.suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
            p = p.resolve()
            if p not in out:
                out.append(p)
    return out


def iter_documents(path: PathLike, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file (see the module doc); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} not found")
    if p.stat().st_size == 0:
        raise ValueError(f"data file {str(p)!r} is empty")
    ext = p.suffix.lower()
    if ext == ".txt":
        yield _read_txt(p)
    elif ext in (".jsonl", ".parquet"):
        yield from _iter_records(p, text_field)
    else:
        raise ValueError(f"data file {str(p)!r}: unsupported extension {ext or '(none)'!r}; "
                         f"supported: {', '.join(SUPPORTED)}")


def _read_txt(p: Path) -> str:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(p)!r}: not valid UTF-8 at byte {e.start}") from None
    if not text.strip():
        raise ValueError(f"data file {str(p)!r} is empty (only whitespace)")
    return text


def _hf_offline() -> None:
    # local files only: nothing may be fetched from the hub (must precede `import datasets`)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _iter_records(p: Path, field: str) -> Iterator[str]:
    _hf_offline()
    import datasets

    kind = "json" if p.suffix.lower() == ".jsonl" else "parquet"
    what = "JSON lines" if kind == "json" else "parquet"
    progress = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our error names the file instead
    try:
        with tempfile.TemporaryDirectory(prefix="seqlm-hf-") as tmp:
            try:
                ds = datasets.load_dataset(kind, data_files=str(p), split="train", cache_dir=tmp)
            except Exception as e:  # DatasetGenerationError, ArrowInvalid, StopIteration, ...
                cause = e.__cause__ or e
                raise ValueError(f"data file {str(p)!r}: cannot be read as {what}: "
                                 f"{type(cause).__name__}: {cause}") from None
            if ds.num_rows == 0:
                raise ValueError(f"data file {str(p)!r} is empty (no records)")
            if field not in ds.column_names:
                raise ValueError(f"data file {str(p)!r}: no record has the field {field!r} "
                                 f"(data.text_field); fields present: {ds.column_names}")
            yield from _column_texts(ds, field, p)
            del ds
    finally:
        datasets.logging.set_verbosity(verbosity)
        if progress:
            datasets.enable_progress_bars()


def _column_texts(ds, field: str, p: Path) -> Iterator[str]:
    feature = ds.features[field]
    is_str = getattr(feature, "dtype", None) in ("string", "large_string")
    row = 0
    if is_str:  # fast path: the Arrow column chunk by chunk
        chunks = ((c.to_pylist()) for c in ds.data.column(field).chunks)
    else:  # mixed/other types: decoded python values in batches
        chunks = (b[field] for b in ds.select_columns([field]).iter(batch_size=1024))
    for values in chunks:
        for v in values:
            if v is None:
                raise ValueError(f"data file {str(p)!r}: record {row + 1} has no field "
                                 f"{field!r} (data.text_field)")
            if not isinstance(v, str):
                raise ValueError(f"data file {str(p)!r}: record {row + 1} field {field!r} is "
                                 f"{type(v).__name__}, expected a string")
            yield v
            row += 1
