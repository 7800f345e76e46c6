"""The data pipeline: parallel chunked tokenization == one process == a naive reference, document
boundaries and seq_idx, document validation split, weighted sources, HF / Arrow / parquet
directories, the fast cache check and bad data files."""
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seqlm.config import ConfigError, DataConfig, TokenizerConfig, parse_config
from seqlm.data import cache as cache_mod
from seqlm.data import pipeline as pipe_mod
from seqlm.data import readers as readers_mod
from seqlm.data.corpora import shakespeare_scenes
from seqlm.data.dataset import load_data, seq_idx_from_eos, seq_idx_from_starts
from seqlm.data.readers import plan_chunks
from seqlm.data.tokenizers import ByteTokenizer, CharTokenizer, build_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SP = ROOT / "tokenizers" / "shakespeare-bpe2048.model"
LINES = ["To be, or not to be: that is the question.", "Café crème, naïve — 中文字符 and 🙂 emoji.",
         "", "   ", "Whether 'tis nobler in the mind to suffer", "x"]


def corpus(seed: int, n: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(rng.choice(LINES) + rng.choice(["\n", "\n", "\n\n", "\n\n\n", " "]))
    return "".join(out)


def reference(docs, tok):
    """Naive: each document's ids then EOS, and where each document starts."""
    ids, starts = [], []
    for d in docs:
        starts.append(len(ids))
        ids += tok.encode(d) + [tok.eos_id]
    return ids, starts


def ref_split(text, sep):
    """Documents of a text under a separator, by an obvious left-to-right scan."""
    if sep is None:
        return [text]
    docs, cur, i = [], "", 0
    while i < len(text):
        if text.startswith(sep, i):
            docs.append(cur + sep)
            cur, i = "", i + len(sep)
        else:
            cur, i = cur + text[i], i + 1
    docs.append(cur)
    return [d for d in docs if d and not d.isspace()]


def run(paths, tok, sep=None, workers=1, field="text"):
    ids_out, docs_out = io.BytesIO(), io.BytesIO()
    dtype = np.dtype(np.uint16)
    counts = pipe_mod.tokenize_files(paths, tok, field, sep, ids_out, docs_out, dtype, workers)
    ids = np.frombuffer(ids_out.getvalue(), dtype).tolist()
    starts = np.frombuffer(docs_out.getvalue(), np.int64).tolist()
    assert counts["n_tokens"] == len(ids) and counts["n_docs"] == len(starts)
    return ids, starts


@pytest.fixture(scope="module")
def sp_tok():
    return load_tokenizer(SP)


@pytest.mark.parametrize("kind", ["char", "byte", "sp"])
def test_chunks_and_workers_give_the_reference_tokens(tmp_path, monkeypatch, kind, sp_tok):
    texts = [corpus(1, 300), corpus(2, 120)]
    recs = [corpus(3 + i, 4) for i in range(40)]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in recs), encoding="utf-8")
    paths = [tmp_path / "0.txt", tmp_path / "r.jsonl", tmp_path / "1.txt"]
    tok = {"char": CharTokenizer.fit(texts + recs), "byte": ByteTokenizer(), "sp": sp_tok}[kind]
    expect = reference(texts[:1] + recs + texts[1:], tok)
    assert run(paths, tok, workers=1) == expect  # one chunk per file, this process
    monkeypatch.setattr(pipe_mod, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(readers_mod, "CHUNK_BYTES", 97)  # odd: cuts land inside characters
    chunks = plan_chunks(paths[0], "text", None, pipe_mod.split_mode(tok))
    assert len(chunks) > 20 and any(not c.doc_start for c in chunks)
    raw = paths[0].read_bytes()
    for c in chunks:  # every cut is on a character boundary (and on a line end for sentencepiece)
        raw[c.lo:c.hi].decode("utf-8")
        assert kind != "sp" or c.lo == 0 or raw[c.lo - 1:c.lo] == b"\n"
    if kind == "char":  # some cuts are inside lines, some right before a multi-byte character
        assert any(raw[c.lo - 1:c.lo] != b"\n" for c in chunks[1:])
    assert run(paths, tok, workers=1) == expect  # many chunks, one process
    assert run(paths, tok, workers=2) == expect  # many chunks, two processes


@pytest.mark.parametrize("sep,text", [
    ("\n\n", "a b\n\nc\n\n\n\nd e\n\n\nf\n\n" * 30 + "tail"),
    ("aa", "xaaay aaaa z aaa " * 40),  # overlapping matches: left to right, like str.split
    ("<|doc|>", "one <|doc|>two<|doc|><|doc|> three\n" * 50),
])
def test_separator_documents(tmp_path, monkeypatch, sep, text):
    p = tmp_path / "t.txt"
    p.write_text(text)
    tok = ByteTokenizer()
    expect = reference(ref_split(text, sep), tok)
    assert run([p], tok, sep) == expect
    monkeypatch.setattr(pipe_mod, "PARALLEL_MIN_BYTES", 0)
    for chunk in (3, 7, 16, 41):
        monkeypatch.setattr(readers_mod, "CHUNK_BYTES", chunk)
        assert run([p], tok, sep, workers=1 + chunk % 2) == expect, chunk
    monkeypatch.setattr(readers_mod, "SEARCH_BYTES", 2)  # no separator within reach: cut mid-document
    assert run([p], tok, sep, workers=2) == expect


def test_document_packing_seq_idx(tmp_path):
    docs = [f"doc {i}: " + "word " * (3 + (7 * i) % 23) + "\n" for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = ByteTokenizer()
    cfg = DataConfig(files=[str(tmp_path / "d.jsonl")], cache_dir=str(tmp_path / "c"), packing="document")
    data = load_data(cfg, tok)
    ids, starts = reference(docs, tok)
    assert data.tokens.tolist() == ids and data.parts[0].doc_starts.tolist() == starts
    doc_of = np.zeros(len(ids), dtype=np.int64)  # document of each position, by a plain walk
    for k, s in enumerate(starts):
        doc_of[s:] = k
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y, seq = data.get_batch("train", 8, 48, g)
        assert seq.dtype == torch.int32 and seq.shape == x.shape == (8, 48)
        for row_x, row_s in zip(x.numpy(), seq.numpy()):
            s0 = next(s for s in range(len(ids)) if ids[s:s + 48] == row_x.tolist())
            assert row_s.tolist() == (doc_of[s0:s0 + 48] - doc_of[s0]).tolist()
        assert torch.equal(seq, seq_idx_from_eos(x, tok.eos_id))  # EOS ends its document
        assert (seq[:, 0] == 0).all() and (seq.diff(dim=1) >= 0).all() and seq.max() > 0
    stream = load_data(cfg.model_copy(update={"packing": "stream"}), tok)
    assert len(stream.get_batch("train", 2, 8, g)) == 2 and stream.from_cache
    n = 0
    for x, y, seq in data.iter_windows("val", 32, stride=16, batch_size=3):
        assert torch.equal(seq, seq_idx_from_eos(x, tok.eos_id))
        n += len(x)
    assert n > 1
    val_starts = data.doc_starts("val")
    lo = len(ids) - data.n_val
    assert val_starts[0] == 0 and val_starts[1:].tolist() == [s - lo for s in starts if s > lo]


def test_seq_idx_from_starts_matches_a_loop():
    rng = np.random.default_rng(0)
    ds = np.unique(np.concatenate([[0], rng.integers(1, 500, 60)]))
    starts = rng.integers(0, 400, 16)
    got = seq_idx_from_starts(ds, starts, 64)
    for b, s in enumerate(starts):
        want = [sum(1 for d in ds if s < d <= s + t) for t in range(64)]
        assert got[b].tolist() == want


def test_validation_split_by_documents(tmp_path):
    docs = [f"{i} " + "z" * (20 + 13 * (i % 9)) + "\n" for i in range(50)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(files=[str(tmp_path / "d.jsonl")], cache_dir=str(tmp_path / "c"), val_split="documents",
                     val_fraction=0.2)
    data = load_data(cfg, ByteTokenizer())
    n, starts = len(data.tokens), data.parts[0].doc_starts.tolist()
    assert n - data.n_val in starts[1:]  # val begins with a whole document
    assert abs(data.n_val / n - 0.2) < 0.03
    val_docs = ByteTokenizer().decode(data.val).split("\n")  # EOS decodes to ""
    assert val_docs[0].split(" ")[0] == str(starts.index(n - data.n_val))
    (tmp_path / "one.txt").write_text("just one document\n" * 20)
    with pytest.raises(ValueError, match=r"val_split: documents needs at least 2 documents.*one\.txt"):
        load_data(cfg.model_copy(update={"files": [str(tmp_path / "one.txt")]}), ByteTokenizer())
    sep = cfg.model_copy(update={"files": [str(tmp_path / "one.txt")], "doc_separator": "\n"})
    assert load_data(sep, ByteTokenizer()).meta["n_docs"] == 20


def test_weighted_sources(tmp_path):
    (tmp_path / "a.txt").write_text("aaaa aaa\n" * 2000)  # big source, low weight
    (tmp_path / "b.txt").write_text("bbb bb\n" * 150)
    cfg = parse_config({"data": {"sources": [{"files": [str(tmp_path / "a.txt")], "weight": 1},
                                             {"files": [str(tmp_path / "b.txt")], "weight": 3}],
                                 "cache_dir": str(tmp_path / "c")}}).data
    tok = build_tokenizer(TokenizerConfig(type="char"), data=cfg)
    assert tok.chars == sorted(set("aaaa aaa\nbbb bb\n"))
    data = load_data(cfg, tok, seq_len=16)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([data.get_batch("train", 50, 16, g)[0] for _ in range(40)])  # (2000, 16)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    from_a, from_b = (rows == a).any(1), (rows == b).any(1)
    assert not (from_a & from_b).any()  # a window never spans two sources
    assert abs(from_b.float().mean().item() - 0.75) < 0.04
    val = torch.cat([data.get_batch("val", 50, 16, g)[0] for _ in range(10)])
    assert ((val == a).any(1) | (val == b).any(1)).all()
    assert len(data.parts) == 2 and data.n_val == sum(p.n_val for p in data.parts)
    assert sum(len(w[0]) for w in data.iter_windows("val", 16, batch_size=4)) > 2
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"data": {"files": ["x.txt"], "sources": [{"files": ["y.txt"]}]}})
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight"):
        parse_config({"data": {"sources": [{"files": ["y.txt"], "weight": 0}]}})


def test_hf_saved_dataset_parquet_and_arrow_dirs(tmp_path, monkeypatch):
    import datasets

    docs = [f"record {i}: " + "é" * (i % 5) + " text" * (i % 7) for i in range(30)]
    tok = ByteTokenizer()
    expect = reference(docs, tok)
    ds = datasets.Dataset.from_dict({"body": docs, "n": list(range(30))})
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=3)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "hfdict"))
    (tmp_path / "pq" / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"body": docs[:12]}), tmp_path / "pq" / "a.parquet", row_group_size=5)
    pq.write_table(pa.table({"body": docs[12:]}), tmp_path / "pq" / "sub" / "b.parquet", row_group_size=4)
    (tmp_path / "ar").mkdir()
    table = pa.table({"body": docs})
    with pa.ipc.new_file(str(tmp_path / "ar" / "a.arrow"), table.schema) as w:  # the IPC file format
        for b in table.to_batches(max_chunksize=7):
            w.write_batch(b)
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    monkeypatch.setattr(pipe_mod, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(readers_mod, "CHUNK_BYTES", 64)  # one row group / batch per chunk
    for i, d in enumerate(["hf", "hfdict", "pq", "ar"]):
        cfg = DataConfig(files=[str(tmp_path / d)], text_field="body", cache_dir=str(tmp_path / "c"), num_workers=2)
        data = load_data(cfg, tok)
        assert (data.tokens.tolist(), data.parts[0].doc_starts.tolist()) == expect, d
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before  # nothing cached beside it
    assert len(plan_chunks(tmp_path / "pq" / "a.parquet", "body", None, "utf8")) == 3
    with pytest.raises(ValueError, match=r"a\.parquet.*no record has the field 'text'.*\['body'\]"):
        load_data(DataConfig(files=[str(tmp_path / "pq")], cache_dir=str(tmp_path / "c")), tok)
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match=r"bad\.arrow.*cannot be read as Arrow"):
        load_data(DataConfig(files=[str(tmp_path / "bad.arrow")], cache_dir=str(tmp_path / "c")), tok)


def test_cache_fast_check_rehash_and_rebuild(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"file {i}\n" * 50)
    cfg = DataConfig(files=[str(tmp_path / "*.txt")], cache_dir=str(tmp_path / "c"))
    tok = ByteTokenizer()
    first = load_data(cfg, tok)
    hashed = []
    real = cache_mod.file_digest
    monkeypatch.setattr(cache_mod, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    assert load_data(cfg, tok).from_cache and hashed == []  # relaunch: stat only
    os.utime(tmp_path / "1.txt")  # touched, same bytes: rehash that file, keep the cache
    again = load_data(cfg, tok)
    assert again.from_cache and hashed == ["1.txt"]
    assert load_data(cfg, tok).from_cache and hashed == ["1.txt"]  # the new stat was remembered
    hashed.clear()
    assert load_data(cfg.model_copy(update={"verify_cache": True}), tok).from_cache
    assert sorted(hashed) == ["0.txt", "1.txt", "2.txt"]  # on request: every file
    (tmp_path / "2.txt").write_text("file 2 changed\n" * 50)
    changed = load_data(cfg, tok)
    assert not changed.from_cache and changed.cache_path == first.cache_path
    assert tok.decode(changed.tokens).endswith("file 2 changed\n")
    os.unlink(tmp_path / "0.txt")  # a file of the glob deleted: another cache
    fewer = load_data(cfg, tok)
    assert not fewer.from_cache and fewer.meta["n_docs"] == 2
    with pytest.raises(FileNotFoundError, match=r"data\.files: file '.*0\.txt' not found"):
        load_data(cfg.model_copy(update={"files": [str(tmp_path / "0.txt")]}), tok)
    other = load_data(cfg, CharTokenizer.fit(["file 0123\nchanged"]))  # another tokenizer, another cache
    assert not other.from_cache and other.cache_path != fewer.cache_path


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_data_files_are_named(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(pipe_mod, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(readers_mod, "CHUNK_BYTES", 100)
    cfg = lambda p: DataConfig(files=[str(p)], cache_dir=str(tmp_path / "c"), num_workers=workers)  # noqa: E731
    good = "good text line\n" * 30
    (tmp_path / "bin.txt").write_bytes(good.encode() + bytes(range(256)))
    (tmp_path / "late.txt").write_bytes(good.encode() * 3 + b"caf\xe9\n" + good.encode())
    (tmp_path / "blank.txt").write_text(" \n\t\n" * 200)
    (tmp_path / "blank.jsonl").write_text("\n" * 300)
    for name, match in [("bin.txt", r"bin\.txt.*binary data \(a NUL byte at byte 450\)"),
                        ("late.txt", r"late\.txt.*not valid UTF-8 at byte 1353"),
                        ("blank.txt", r"blank\.txt.* is empty \(only whitespace\)"),
                        ("blank.jsonl", r"blank\.jsonl.* is empty \(no records\)")]:
        with pytest.raises(ValueError, match=match):
            load_data(cfg(tmp_path / name), ByteTokenizer())
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_shakespeare_scenes():
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
    scenes = shakespeare_scenes(text)
    assert "".join(scenes) == text and len(scenes) > 100
    assert all(s.split(":\n")[0] for s in scenes)


def test_hf_tokenizer_in_workers(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import EOS, build_tokenizer as build_hf_tok

    from seqlm.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(build_hf_tok().to_str().encode(), EOS)
    text = corpus(5, 200)
    (tmp_path / "a.txt").write_text(text)
    expect = reference([text], tok)
    monkeypatch.setattr(pipe_mod, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(readers_mod, "CHUNK_BYTES", 300)
    assert tok.split_safe and run([tmp_path / "a.txt"], tok, workers=2) == expect
