"""Token datasets: sources, the memmapped token cache, splits, batches and eval windows."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seqlm.config import DataConfig
from seqlm.data import cache as cache_mod
from seqlm.data import pipeline as pipe_mod
from seqlm.data import readers as readers_mod
from seqlm.data.dataset import load_data, token_dtype
from seqlm.data.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT_A = "".join(f"line {i}: to be or not to be.\n" for i in range(200))
TEXT_B = "".join(f"second file, row {i}; that is the question?\n" for i in range(100))
ALL_CHARS = CharTokenizer.fit([TEXT_A, TEXT_B, "xyzé"])


def cfg_for(tmp_path, files, **kw):
    return DataConfig(files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture
def two_txt(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    (tmp_path / "b.txt").write_text(TEXT_B)
    return tmp_path / "a.txt", tmp_path / "b.txt"


def test_txt_documents_joined_with_eos(tmp_path, two_txt):
    tok = ALL_CHARS
    data = load_data(cfg_for(tmp_path, [tmp_path / "*.txt"]), tok)  # glob, sorted
    expect = tok.encode(TEXT_A) + [tok.eos_id] + tok.encode(TEXT_B) + [tok.eos_id]
    assert data.tokens.tolist() == expect and data.tokens.dtype == np.uint16
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    n_val = round(len(expect) * 0.1)
    assert len(data.val) == n_val and data.train.tolist() + data.val.tolist() == expect
    assert data.meta["n_docs"] == 2 and not data.from_cache


def test_token_dtype_uint32_for_big_vocab(tmp_path):
    assert token_dtype(65534) == np.uint16 and token_dtype(65535) == np.uint32
    chars = [chr(c) for c in range(0x100, 0x100 + 70000) if not 0xD800 <= c <= 0xDFFF]
    tok = CharTokenizer(chars)
    text = "".join(chars[-200:])
    (tmp_path / "big.txt").write_text(text)
    data = load_data(cfg_for(tmp_path, [tmp_path / "big.txt"]), tok)
    assert data.tokens.dtype == np.uint32 and data.tokens.tolist() == tok.encode(text) + [tok.eos_id]


def test_cache_reused_without_retokenizing(tmp_path, two_txt, monkeypatch):
    cfg = cfg_for(tmp_path, two_txt)
    first = load_data(cfg, ALL_CHARS)
    mtime = first.cache_path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("retokenized although the cache is valid")

    monkeypatch.setattr(cache_mod, "tokenize_files", boom)
    monkeypatch.setattr(cache_mod, "file_digest", boom)  # the fast check: a stat per file, no rehash
    second = load_data(cfg, ALL_CHARS)
    assert second.from_cache and second.cache_path == first.cache_path
    assert first.cache_path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_cache_rebuilt_on_content_change_even_with_same_size_and_mtime(tmp_path, two_txt):
    cfg = cfg_for(tmp_path, two_txt)
    first = load_data(cfg, ALL_CHARS)
    a = two_txt[0]
    st = a.stat()
    a.write_text(TEXT_A.replace("line 7:", "line x:"))  # same length
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    second = load_data(cfg, ALL_CHARS)
    assert not second.from_cache and second.cache_path == first.cache_path  # rebuilt in place
    assert ALL_CHARS.decode(second.tokens).startswith(TEXT_A.replace("line 7:", "line x:"))
    with open(a, "a") as f:
        f.write("line 999: not to be.\n")
    assert not load_data(cfg, ALL_CHARS).from_cache


def test_cache_rebuilt_when_tokenizer_changes(tmp_path, two_txt):
    cfg = cfg_for(tmp_path, two_txt)
    a = load_data(cfg, ALL_CHARS)
    b = load_data(cfg, ByteTokenizer())
    c = load_data(cfg, CharTokenizer(ALL_CHARS.chars + ["~"]))  # one more character, new ids
    assert not b.from_cache and not c.from_cache
    assert len({a.cache_path, b.cache_path, c.cache_path}) == 3
    assert b.tokens[:5].tolist() == list(TEXT_A[:5].encode())
    assert c.tokens[-1] == c.tokenizer.eos_id != a.tokenizer.eos_id


def test_incomplete_cache_is_rebuilt(tmp_path, two_txt):
    cfg = cfg_for(tmp_path, two_txt)
    first = load_data(cfg, ALL_CHARS)
    expect, path = np.array(first.tokens), first.cache_path
    del first  # unmap before truncating (touching a truncated mapping is a SIGBUS)
    with open(path, "r+b") as f:
        f.truncate(10)  # a torn .bin no longer matches its .json
    again = load_data(cfg, ALL_CHARS)
    assert not again.from_cache and np.array_equal(again.tokens, expect)


def test_jsonl_and_parquet(tmp_path):
    docs = ["first doc\nwith two lines", "second", "", "third é"]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs[:2], "n": [1, 2]}), tmp_path / "d.parquet")
    tok = ByteTokenizer()
    data = load_data(cfg_for(tmp_path, [jl, tmp_path / "d.parquet"], text_field="body"), tok)
    expect = []
    for d in docs + docs[:2]:
        expect += tok.encode(d) + [tok.eos_id]
    assert data.tokens.tolist() == expect and data.meta["n_docs"] == 6


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", "", r"empty\.txt.* is empty"),
    ("blank.txt", "  \n", r"blank\.txt.* is empty"),
    ("empty.jsonl", "", r"empty\.jsonl.* is empty"),
    ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', r"nofield\.jsonl.*record 2 has no field 'text'"),
    ("allmissing.jsonl", '{"body": "b"}\n', r"allmissing\.jsonl.*no record has the field 'text'"),
    ("number.jsonl", '{"text": "a"}\n{"text": 5}\n', r"number\.jsonl.*record 2 field 'text' is int"),
    ("broken.jsonl", '{"text": "a"}\nnot json\n', r"broken\.jsonl.*cannot be read as JSON lines"),
    ("notparquet.parquet", "hello", r"notparquet\.parquet.*cannot be read as parquet"),
    ("data.csv", "a,b\n", r"data\.csv.*unsupported extension '\.csv'"),
    ("latin1.txt", b"caf\xe9\n", r"latin1\.txt.*not valid UTF-8 at byte 3"),
])
def test_bad_files_are_named(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=match):
        load_data(cfg_for(tmp_path, [p]), ByteTokenizer())


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.files: file '.*nope\.txt' not found"):
        load_data(cfg_for(tmp_path, [tmp_path / "nope.txt"]), ByteTokenizer())
    with pytest.raises(FileNotFoundError, match=r"pattern '.*\*\.jsonl' matches no file"):
        load_data(cfg_for(tmp_path, [tmp_path / "*.jsonl"]), ByteTokenizer())


def test_unknown_character_names_the_file(tmp_path, two_txt):
    (tmp_path / "c.txt").write_text("abc\nxyz\u00b5 \n")
    with pytest.raises(ValueError, match=r"c\.txt.*'µ' \(U\+00B5\) at position 7"):
        load_data(cfg_for(tmp_path, [tmp_path / "c.txt"]), ALL_CHARS)


def test_val_too_small_is_explained(tmp_path, two_txt):
    data = load_data(cfg_for(tmp_path, [two_txt[1]], val_fraction=0.01), ALL_CHARS)  # val ~43 tokens
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"data.val_fraction: the val split has \d+ tokens.*b\.txt"):
        data.get_batch("train", 2, 64, gen)
    with pytest.raises(ValueError, match="data.val_fraction"):
        load_data(cfg_for(tmp_path, [two_txt[1]], val_fraction=0.01), ALL_CHARS, seq_len=64)
    data.get_batch("val", 2, 16, gen)  # fits


def test_get_batch_shapes_shift_and_determinism(tmp_path, two_txt):
    data = load_data(cfg_for(tmp_path, two_txt), ALL_CHARS)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x, y = data.get_batch("train", 5, 16, g1)
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(data.train.astype(np.int64))
    for row_x, row_y in zip(x, y):  # each row is a real window of the train split
        starts = [s for s in range(len(train) - 16) if torch.equal(train[s:s + 16], row_x)]
        assert any(torch.equal(train[s + 1:s + 17], row_y) for s in starts)
    x2, y2 = data.get_batch("train", 5, 16, g2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.get_batch("train", 5, 16, g1)  # the generator advanced
    assert not torch.equal(x, x3)
    xv, yv = data.get_batch("val", 3, 8, torch.Generator().manual_seed(0))
    val = data.val.tolist()
    assert all(any(val[s:s + 8] == r.tolist() for s in range(len(val) - 8)) for r in xv)
    with pytest.raises(ValueError, match="split"):
        data.get_batch("test", 1, 4, g1)


@pytest.mark.parametrize("stride,batch", [(None, 1), (5, 3), (16, 4), (1, 8)])
def test_iter_windows_scores_each_token_once(tmp_path, two_txt, stride, batch):
    T = 16
    data = load_data(cfg_for(tmp_path, [two_txt[1]], val_fraction=0.05), ALL_CHARS)
    val = data.val.astype(np.int64)
    done, ends = 0, []  # targets val[1..done] scored so far
    for x, y in data.iter_windows("val", T, stride=stride, batch_size=batch):
        assert x.shape == y.shape and x.shape[1] == T and 1 <= x.shape[0] <= batch
        for rx, ry in zip(x.numpy(), y.numpy()):
            m = int((ry != -100).sum())
            assert m >= 1 and (ry[:T - m] == -100).all()  # the new targets are the row's tail
            end = done + m  # this row scores val[done+1 .. end] and ends at token `end`
            assert np.array_equal(rx, val[end - T:end]) and np.array_equal(ry[T - m:], val[end - m + 1:end + 1])
            done = end
            ends.append(end)
    assert done == len(val) - 1  # every target once, in order
    step = stride or T
    assert all(b - a == step for a, b in zip(ends[:-1], ends[1:-1]))
    assert ends[0] == T and len(ends) == 1 + -(-(len(val) - 1 - T) // step)


def test_big_document_split_into_pieces_same_tokens(tmp_path, monkeypatch):
    text = "".join(f"row {i} of a long document, with words.\n" for i in range(3000))
    (tmp_path / "big.txt").write_text(text)
    sp = load_tokenizer(ROOT / "tokenizers" / "shakespeare-bpe2048.model")
    whole = sp.encode(text) + [sp.eos_id]
    monkeypatch.setattr(pipe_mod, "PIECE_CHARS", 1000)
    monkeypatch.setattr(readers_mod, "CHUNK_BYTES", 5000)
    pieces = list(pipe_mod._pieces(text, True))
    assert len(pieces) > 50 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces)
    assert load_data(cfg_for(tmp_path, [tmp_path / "big.txt"]), sp, progress=True).tokens.tolist() == whole


def test_tinyshakespeare_char_is_fast(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))  # the default corpus
    t0 = time.perf_counter()
    from seqlm.config import TokenizerConfig
    from seqlm.data.tokenizers import build_tokenizer

    tok = build_tokenizer(TokenizerConfig(type="char"), cfg.files)
    data = load_data(cfg, tok)
    assert time.perf_counter() - t0 < 3.0  # ~0.1 s: vectorised lookup, no per-char Python loop
    assert tok.vocab_size == 66 and len(data.tokens) == 1115394 + 1
