"""Parallel, streaming tokenization of data files into a token cache.

:func:`tokenize_files` cuts every file into chunks (:mod:`seqlm.data.readers`), encodes them in
``num_workers`` processes (1: in this process; each worker runs one thread) and writes the ids
and the document starts to two binary files as the chunks come back, in order: at most
``2 * num_workers`` chunks are in flight, so memory does not grow with the corpus. The output
is the same for any number of workers and any chunk size (tests/test_data_pipeline.py): chunks
are cut only where the tokenizer encodes the two sides independently.

Layout: ids = for each document, its tokens then EOS; ``doc_starts`` (int64) = the position of
each document's first token (of its EOS when it has none), ascending, starting at 0.
"""
from __future__ import annotations

import copy
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from seqlm.data.readers import Chunk, plan_chunks, read_chunk
from seqlm.data.tokenizer_base import Tokenizer

PROGRESS_MIN_BYTES = 8 << 20  # show a tqdm bar when the inputs are at least this large
PARALLEL_MIN_BYTES = 2 << 20  # fewer bytes than this: tokenize in this process
PIECE_CHARS = 1 << 20  # big pieces are encoded in parts of about this many characters


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def split_mode(tokenizer: Tokenizer) -> Optional[str]:
    """Where a document may be cut for independent encoding (see readers.plan_chunks)."""
    if tokenizer.type in ("char", "byte"):
        return "utf8"
    return "line" if tokenizer.split_safe else None


def _pieces(doc: str, safe: bool) -> Iterator[str]:
    """Split a big text after newlines into pieces of ~PIECE_CHARS (when safe)."""
    if not safe or len(doc) <= PIECE_CHARS:
        yield doc
        return
    start = 0
    while len(doc) - start > PIECE_CHARS:
        nl = doc.rfind("\n", start, start + PIECE_CHARS)
        if nl < 0:
            nl = doc.find("\n", start + PIECE_CHARS)
            if nl < 0:
                break
        yield doc[start:nl + 1]
        start = nl + 1
    if start < len(doc):
        yield doc[start:]


def encode_chunk(tok: Tokenizer, chunk: Chunk, text_field: str, separator: Optional[str],
                 dtype: str) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """(ids, document starts within ids, whether the chunk has non-space text, records)."""
    texts: list[str] = []
    flags: list[tuple[bool, bool]] = []  # (starts a document, ends one) per entry of texts
    has_text, n_pieces = False, 0
    for text, starts, ends in read_chunk(chunk, text_field, separator):
        n_pieces += 1
        has_text = has_text or (bool(text) and not text.isspace())
        parts = list(_pieces(text, tok.split_safe)) or [""]
        for j, part in enumerate(parts):
            texts.append(part)
            flags.append((starts and j == 0, ends and j == len(parts) - 1))
    try:
        encoded = tok.encode_batch(texts)
    except ValueError as e:  # name the file and where the failing text starts
        where = "row" if chunk.kind in ("parquet", "arrow") else "byte"
        raise ValueError(f"data file {chunk.path!r} (the text from {where} {chunk.lo}): {e}") from None
    out, starts_at, n = [], [], 0
    eos = np.array([tok.eos_id], dtype=np.int64)
    for ids, (s, e) in zip(encoded, flags):
        if s:
            starts_at.append(n)
        out.append(ids)
        n += len(ids)
        if e:
            out.append(eos)
            n += 1
    ids = np.concatenate(out).astype(dtype, copy=False) if out else np.zeros(0, dtype)
    n_records = n_pieces if chunk.kind != "txt" else 0
    return ids, np.asarray(starts_at, dtype=np.int64), has_text, n_records


_WORKER: dict = {}


def _init_worker(tok: Tokenizer, pool: bool = True) -> None:
    """One thread per worker: torch, sentencepiece's batch encoder, HF tokenizers' thread pool
    (the environment of a pool worker only: this process's is left alone)."""
    if pool:
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if pool and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    tok = copy.copy(tok)
    tok.num_threads = 1
    _WORKER["tok"] = tok


def _usage() -> tuple[int, float, float]:
    """(pid, peak RSS in MB, CPU seconds) of this process."""
    try:
        import resource
    except ImportError:  # not POSIX
        return os.getpid(), 0.0, 0.0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return os.getpid(), ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime


def _work(chunk: Chunk, text_field: str, separator: Optional[str], dtype: str):
    return encode_chunk(_WORKER["tok"], chunk, text_field, separator, dtype) + (_usage(),)


def _context():
    """Workers come from a fork server that has imported only this module (small, and no
    fork of a process that runs threads); spawn where there is no fork server."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["seqlm.data.pipeline"])
        return ctx
    return mp.get_context("spawn")


def _results(chunks: list[Chunk], tok: Tokenizer, text_field: str, separator: Optional[str],
             dtype: str, workers: int) -> Iterator[tuple]:
    """encode_chunk's results in chunk order, from ``workers`` processes (bounded in flight)."""
    if workers <= 1 or len(chunks) <= 1:
        _init_worker(tok, pool=False)
        try:
            for c in chunks:
                yield _work(c, text_field, separator, dtype)
        finally:
            _WORKER.clear()
        return
    with _context().Pool(min(workers, len(chunks)), _init_worker, (tok,)) as pool:
        todo = iter(chunks)
        pending: deque = deque()
        for c in todo:
            pending.append(pool.apply_async(_work, (c, text_field, separator, dtype)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            r = pending.popleft().get()
            c = next(todo, None)
            if c is not None:
                pending.append(pool.apply_async(_work, (c, text_field, separator, dtype)))
            yield r


def tokenize_files(paths: Sequence[Path], tokenizer: Tokenizer, text_field: str, separator: Optional[str],
                   ids_out: BinaryIO, docs_out: BinaryIO, dtype: np.dtype, num_workers: Optional[int] = None,
                   progress: Optional[bool] = None) -> dict:
    """Encode every document of ``paths`` (EOS after each); write ids to ``ids_out`` and the
    int64 document starts to ``docs_out``. Returns counts. Errors name the file."""
    mode = split_mode(tokenizer)
    chunks = [c for p in paths for c in plan_chunks(Path(p), text_field, separator, mode)]
    total = sum(c.nbytes for c in chunks)
    workers = default_workers() if num_workers is None else num_workers
    if total < PARALLEL_MIN_BYTES:
        workers = 1
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing ({workers} worker{'s' * (workers > 1)})",
               dynamic_ncols=True, disable=not (progress if progress is not None else total >= PROGRESS_MIN_BYTES))
    n_tokens = n_docs = 0
    has_text: dict[str, bool] = {}
    records: dict[str, int] = {}
    usage: dict[int, tuple[float, float]] = {}  # worker pid -> (peak RSS MB, CPU s)
    t0 = time.perf_counter()
    try:
        for c, (ids, starts, text, n_rec, (pid, rss, cpu)) in zip(chunks, _results(chunks, tokenizer, text_field, separator,
                                                                  np.dtype(dtype).name, workers)):
            ids_out.write(ids.tobytes())
            docs_out.write((starts + n_tokens).tobytes())
            n_tokens += len(ids)
            n_docs += len(starts)
            has_text[c.path] = has_text.get(c.path, False) or text
            records[c.path] = records.get(c.path, 0) + n_rec
            usage[pid] = (rss, cpu)
            bar.update(c.nbytes)
    finally:
        bar.close()
    for c in chunks:
        if c.kind == "txt" and not has_text[c.path]:
            raise ValueError(f"data file {c.path!r} is empty (only whitespace)")
        if c.kind == "jsonl" and records[c.path] == 0:
            raise ValueError(f"data file {c.path!r} is empty (no records)")
    if n_tokens == 0 or n_docs == 0:
        raise ValueError(f"data files {[str(p) for p in paths]} hold no text")
    build = {"workers": workers, "seconds": time.perf_counter() - t0,
             "worker_peak_rss_mb": max(r for r, _ in usage.values()),  # this process's when workers == 1
             "worker_cpu_s": sum(c for _, c in usage.values()) if workers > 1 else None}
    return {"n_tokens": n_tokens, "n_docs": n_docs, "n_bytes": total, "build": build}
