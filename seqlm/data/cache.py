"""The token cache of one source: ``<stem>.bin`` (ids), ``<stem>.docs`` (int64 document
starts) and ``<stem>.json`` (metadata, written last: it marks the cache complete).

The file name's key hashes what decides the ids apart from the files' bytes: the resolved
paths, the text field, the document separator, the tokenizer's fingerprint and the id dtype
(another tokenizer -> another cache). The metadata keeps each file's size, mtime, ctime and
blake2b digest. On a relaunch the check is a ``stat`` per file; a file whose size or times
changed is rehashed, and the cache is reused (its metadata refreshed) only if the digest is
unchanged; ``verify=True`` (``data.verify_cache``) rehashes every file. A changed file
rebuilds the cache in place; a file deleted from a glob changes the key. Everything is
written to temp names and renamed, so a cache is complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from seqlm.data.pipeline import tokenize_files
from seqlm.data.tokenizer_base import Tokenizer, public_mode

CACHE_VERSION = 2


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65535 else np.uint32)


def file_digest(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)  # hashlib releases the GIL: files hash in parallel threads
    return h.hexdigest()


def file_digests(paths: Sequence[Path]) -> list[str]:
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(min(8, len(paths))) as ex:
        return list(ex.map(file_digest, paths))


def file_stat(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def cache_key(paths: Sequence[Path], tokenizer: Tokenizer, text_field: str, separator: Optional[str]) -> str:
    blob = {"v": CACHE_VERSION, "files": [str(p) for p in paths], "text_field": text_field,
            "separator": separator, "tokenizer": tokenizer.fingerprint(),
            "dtype": token_dtype(tokenizer.vocab_size).name}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        public_mode(fd)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check(meta_path: Path, bin_path: Path, docs_path: Path, key: str, dtype: np.dtype,
           paths: Sequence[Path], verify: bool) -> Optional[dict]:
    """The metadata when the cache is complete and its files unchanged, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta.get("key") == key and meta.get("dtype") == dtype.name and meta["n_tokens"] > 0 and
              bin_path.stat().st_size == meta["n_tokens"] * dtype.itemsize and
              docs_path.stat().st_size == meta["n_docs"] * 8 and len(meta["files"]) == len(paths))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    now = [file_stat(p) for p in paths]
    stale = [i for i, (a, b) in enumerate(zip(meta["files"], now))
             if verify or any(a.get(k) != b[k] for k in ("path", "size", "mtime_ns", "ctime_ns"))]
    if not stale:
        return meta
    digests = file_digests([paths[i] for i in stale])
    if any(meta["files"][i].get("digest") != d for i, d in zip(stale, digests)):
        return None
    for i in stale:  # same bytes, new times (touched, copied): remember the new stat
        meta["files"][i] = {**now[i], "digest": meta["files"][i]["digest"]}
    try:
        _write_json(meta_path, meta)
    except OSError:
        pass  # a read-only cache stays usable; the next launch rehashes again
    return meta


def load_source(paths: Sequence[Path], tokenizer: Tokenizer, text_field: str, separator: Optional[str],
                cache_dir: Path, num_workers: Optional[int] = None, verify: bool = False,
                progress: Optional[bool] = None) -> tuple[np.ndarray, np.ndarray, dict, bool, Path]:
    """(ids memmap, document starts memmap, metadata, from cache, ids path), building the
    cache when it is missing or stale."""
    key = cache_key(paths, tokenizer, text_field, separator)
    dtype = token_dtype(tokenizer.vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{paths[0].stem[:40]}-{tokenizer.type}-{key[:16]}"
    bin_path, docs_path, meta_path = (cache_dir / f"{stem}{ext}" for ext in (".bin", ".docs", ".json"))
    meta = _check(meta_path, bin_path, docs_path, key, dtype, paths, verify)
    from_cache = meta is not None
    if meta is None:
        stats = [file_stat(p) for p in paths]  # before reading: a file edited meanwhile looks stale next time
        tmps = []
        try:
            for prefix in (f".{stem}.bin.tmp-", f".{stem}.docs.tmp-"):
                fd, tmp = tempfile.mkstemp(prefix=prefix, dir=cache_dir)
                public_mode(fd)
                os.close(fd)
                tmps.append(tmp)
            with open(tmps[0], "wb") as ids_out, open(tmps[1], "wb") as docs_out:
                counts = tokenize_files(paths, tokenizer, text_field, separator, ids_out, docs_out,
                                        dtype, num_workers, progress)
            digests = file_digests(paths)
            # a file edited while it was read gets no digest: the next launch rebuilds
            digests = [d if file_stat(p) == s else None for p, s, d in zip(paths, stats, digests)]
            os.replace(tmps[0], bin_path)
            os.replace(tmps[1], docs_path)
        except BaseException:
            for t in tmps:
                if os.path.exists(t):
                    os.unlink(t)
            raise
        meta = {"key": key, "version": CACHE_VERSION, "dtype": dtype.name, **counts,
                "files": [{**s, "digest": d} for s, d in zip(stats, digests)], "text_field": text_field,
                "separator": separator, "tokenizer_type": tokenizer.type,
                "tokenizer_fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}
        _write_json(meta_path, meta)
    ids = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    docs = np.memmap(docs_path, dtype=np.int64, mode="r", shape=(meta["n_docs"],))
    return ids, docs, meta, from_cache, bin_path
