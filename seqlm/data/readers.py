"""Split data files into chunks that can be read (and tokenized) independently, and read them.

:func:`plan_chunks` cuts one file into :class:`Chunk` s of about ``chunk_bytes``:
- ``.txt`` / ``.jsonl``: byte ranges. A jsonl range ends after a newline (whole records). A txt
  range ends after a document separator when there is one within reach (a match of the same
  left-to-right scan that splits documents), else, in the middle of a document, at a point the
  tokenizer allows (``mode``): ``"utf8"`` any character boundary (char / byte tokenizers),
  ``"line"`` after a newline (tokenizers that encode ``a + b`` as ``a``, ``b`` when ``a`` ends
  with a newline), ``None`` nowhere (the document stays whole).
- ``.parquet``: ranges of row groups; ``.arrow``: ranges of record batches (memory-mapped).

:func:`read_chunk` yields the chunk's text as ``(text, starts_document, ends_document)`` pieces,
so that the pieces of all chunks of a file, in order, are that file's documents.
"""
from __future__ import annotations

import itertools
import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

CHUNK_BYTES = 4 << 20  # target size of one chunk (one task of a tokenizer worker)
SEARCH_BYTES = 16 << 20  # look this far past the target for a separator before cutting mid-document
ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class Chunk:
    path: str
    kind: str  # txt | jsonl | parquet | arrow
    lo: int  # bytes (txt, jsonl), row groups (parquet) or record batches (arrow): [lo, hi)
    hi: int
    size: int  # the file's size in bytes (txt, jsonl) / number of row groups or batches
    nbytes: int  # data bytes, for progress
    doc_start: bool = True  # the chunk's first piece starts a document
    doc_end: bool = True  # its last piece ends one
    first_row: int = 0  # records before this chunk (parquet, arrow)


def _err(path, msg: str) -> ValueError:
    return ValueError(f"data file {str(path)!r}{msg}")


def kind_of(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def plan_chunks(path: Path, text_field: str, separator: Optional[str], mode: Optional[str],
                chunk_bytes: Optional[int] = None) -> list[Chunk]:
    """The chunks of one file (see the module doc); errors name the file."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    size = path.stat().st_size
    if size == 0:
        raise _err(path, " is empty")
    kind = kind_of(path)
    if kind in ("txt", "jsonl"):
        sep = separator.encode() if (separator and kind == "txt") else None
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cuts = [(0, True)]
            while cuts[-1][0] < size:
                t = cuts[-1][0] + chunk_bytes
                if t >= size:
                    cuts.append((size, True))
                elif kind == "jsonl":
                    i = mm.find(b"\n", t)
                    cuts.append((size if i < 0 else i + 1, True))
                else:
                    cuts.append(_txt_cut(mm, size, t, sep, mode))
        return [Chunk(str(path), kind, a, b, size, b - a, da, db) for (a, da), (b, db) in zip(cuts[:-1], cuts[1:])]
    if kind == "parquet":
        pf, _ = _parquet(path, text_field)
        md = pf.metadata
        sizes = [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
        rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    elif kind == "arrow":
        with _arrow_batches(path) as (batches, schema):
            _check_schema(path, schema, text_field)
            idx = schema.get_field_index(text_field)
            sizes, rows = [], []
            for b in batches:
                sizes.append(b.column(idx).nbytes)
                rows.append(b.num_rows)
    else:
        raise _err(path, f": unsupported extension {path.suffix or '(none)'!r}")
    if sum(rows) == 0:
        raise _err(path, " is empty (no records)")
    out, lo, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= chunk_bytes or i == len(sizes) - 1:
            out.append(Chunk(str(path), kind, lo, i + 1, len(sizes), acc, first_row=sum(rows[:lo])))
            lo, acc = i + 1, 0
    return out


def _txt_cut(mm, size: int, t: int, sep: Optional[bytes], mode: Optional[str]) -> tuple[int, bool]:
    """Where a txt chunk that should end near ``t`` ends: (position, is a document boundary)."""
    if sep:
        n, i, end = len(sep), t, min(size, t + SEARCH_BYTES)
        while (i := mm.find(sep, i, end)) >= 0:
            if mm.find(sep, max(0, i - n + 1), i + n) == i:  # no earlier match overlaps it
                return i + n, True
            i += 1
    if mode is None:
        if not sep:
            return size, True
        i = mm.find(sep, t)  # the next separator, however far
        while i >= 0 and mm.find(sep, max(0, i - len(sep) + 1), i + len(sep)) != i:
            i = mm.find(sep, i + 1)
        return (size, True) if i < 0 else (i + len(sep), True)
    p = t
    while True:
        if mode == "line":
            i = mm.find(b"\n", p)
            p = size if i < 0 else i + 1
        else:  # utf8: not inside a multi-byte character
            while p < size and (mm[p] & 0xC0) == 0x80:
                p += 1
        if p >= size:
            return size, True
        # a separator match may not straddle the cut
        if not sep or mm.find(sep, max(0, p - len(sep) + 1), p + len(sep) - 1) < 0:
            return p, False
        p += 1


def read_chunk(chunk: Chunk, text_field: str, separator: Optional[str]) -> Iterator[tuple[str, bool, bool]]:
    """The chunk's text as (text, starts a document, ends a document) pieces."""
    path = Path(chunk.path)
    if chunk.kind == "txt":
        text = _decode(path, chunk.lo, chunk.hi)
        if chunk.lo == 0 and chunk.hi == chunk.size and not text.strip():
            raise _err(path, " is empty (only whitespace)")
        yield from _split(text, separator, chunk.doc_start, chunk.doc_end)
        return
    for text in _records(chunk, text_field):
        yield from _split(text, separator, True, True)


def _split(text: str, sep: Optional[str], starts: bool, ends: bool) -> Iterator[tuple[str, bool, bool]]:
    if not sep:
        yield text, starts, ends
        return
    parts = text.split(sep)
    last = len(parts) - 1
    for j, part in enumerate(parts):
        piece = part + sep if j < last else part
        s, e = starts if j == 0 else True, ends if j == last else True
        if j == last and not piece and ends:
            continue
        if s and e and piece.isspace():
            continue  # a document of only whitespace (e.g. extra blank lines)
        yield piece, s, e


def _decode(path: Path, lo: int, hi: int) -> str:
    with open(path, "rb") as f:
        f.seek(lo)
        raw = f.read(hi - lo)
    nul = raw.find(b"\0")
    if nul >= 0:
        raise _err(path, f": binary data (a NUL byte at byte {lo + nul}), not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(path, f": not valid UTF-8 at byte {lo + e.start}") from None


def _records(chunk: Chunk, field: str) -> Iterator[str]:
    path = Path(chunk.path)
    if chunk.kind == "jsonl":
        text = _decode(path, chunk.lo, chunk.hi)
        n = 0
        for j, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            n += 1
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise _err(path, f": cannot be read as JSON lines: line {_line_no(path, chunk.lo) + j}: {e}") from None
            if not isinstance(rec, dict):
                raise _err(path, f": cannot be read as JSON lines: line {_line_no(path, chunk.lo) + j} "
                           f"is a {type(rec).__name__}, not an object")
            v = rec.get(field)
            if not isinstance(v, str):
                _bad_value(path, v, field, lambda: _jsonl_record_no(path, chunk.lo) + n, lambda: _jsonl_fields(path, field))
            yield v
        if n == 0 and chunk.lo == 0 and chunk.hi == chunk.size:
            raise _err(path, " is empty (no records)")
        return
    row = chunk.first_row
    if chunk.kind == "parquet":
        pf, _ = _parquet(path, field)
        batches = pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=list(range(chunk.lo, chunk.hi)), columns=[field])
        yield from _column_values(path, batches, field, row)
        return
    with _arrow_batches(path, chunk.lo, chunk.hi) as (batches, schema):
        idx = schema.get_field_index(field)
        yield from _column_values(path, (b.select([idx]) for b in batches), field, row)


def _column_values(path, batches, field, row) -> Iterator[str]:
    for b in batches:
        for v in b.column(0).to_pylist():
            row += 1
            if not isinstance(v, str):
                _bad_value(path, v, field, lambda: row, None)
            yield v


def _bad_value(path, v, field, record_no, fields_present) -> None:
    if v is None:
        if fields_present is not None:
            present = fields_present()
            if present is not None:
                raise _err(path, f": no record has the field {field!r} (data.text_field); fields present: {present}")
        raise _err(path, f": record {record_no()} has no field {field!r} (data.text_field)")
    raise _err(path, f": record {record_no()} field {field!r} is {type(v).__name__}, expected a string")


def _line_no(path: Path, lo: int) -> int:
    with open(path, "rb") as f:
        return f.read(lo).count(b"\n") + 1


def _jsonl_lines(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    return
                yield rec if isinstance(rec, dict) else {}


def _jsonl_record_no(path: Path, lo: int) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f.read(lo).split(b"\n") if line.strip())


def _jsonl_fields(path: Path, field: str) -> Optional[list]:
    """The fields of the first record when no record of the file has ``field``, else None."""
    first = None
    for rec in _jsonl_lines(path):
        first = sorted(rec) if first is None else first
        if rec.get(field) is not None:
            return None
    return first or []


def _check_schema(path: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise _err(path, f": no record has the field {field!r} (data.text_field); fields present: {schema.names}")
    t = schema.field(field).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise _err(path, f": field {field!r} (data.text_field) is {t}, expected a string")


def _parquet(path: Path, field: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except Exception as e:  # ArrowInvalid, OSError, ...
        raise _err(path, f": cannot be read as parquet: {type(e).__name__}: {e}") from None
    _check_schema(path, pf.schema_arrow, field)
    return pf, pf.schema_arrow


class _arrow_batches:
    """``with _arrow_batches(path, lo, hi) as (batches, schema)``: the record batches [lo, hi)
    of an Arrow IPC file or stream, memory-mapped (no copy)."""

    def __init__(self, path: Path, lo: int = 0, hi: Optional[int] = None):
        self.path, self.lo, self.hi = path, lo, hi

    def __enter__(self):
        import pyarrow as pa

        try:
            self.src = pa.memory_map(str(self.path), "r")
            if self.src.read(6) == b"ARROW1":  # the IPC file format (random access)
                self.src.seek(0)
                r = pa.ipc.open_file(self.src)
                hi = r.num_record_batches if self.hi is None else self.hi
                batches = (r.get_batch(i) for i in range(self.lo, hi))
            else:  # the IPC stream format (what datasets' save_to_disk writes)
                self.src.seek(0)
                r = pa.ipc.open_stream(self.src)
                batches = itertools.islice(r, self.lo, self.hi)
        except Exception as e:  # ArrowInvalid, OSError, ...
            raise _err(self.path, f": cannot be read as Arrow: {type(e).__name__}: {e}") from None
        return batches, r.schema

    def __exit__(self, *exc):
        self.src.close()
        return False
