"""Tokenizers: round-trips, save/load, fingerprints, sentencepiece training and its CLI."""
import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from seqlm.cli import run_command
from seqlm.config import TokenizerConfig
from seqlm.data import cli as data_cli
from seqlm.data.tokenizers import (ByteTokenizer, CharTokenizer, build_tokenizer, load_tokenizer,
                                   train_sentencepiece)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tokenizers" / "shakespeare-bpe2048.model"
_R = random.Random(0)
_SYL = ["ka", "lo", "mi", "ten", "ra", "shu", "vel", "dor", "an", "is", "the", "qu", "ick", "fox", "ber"]
CORPUS = "".join(" ".join("".join(_R.choice(_SYL) for _ in range(_R.randint(1, 3)))
                          for _ in range(_R.randint(3, 10))) + _R.choice(".,!?;") + "\n"
                 for _ in range(400)) + "And  then,\tit slept 42 times!\n\n"
UNICODE = "naïve café — 東京 😀\n  two  spaces\ttab\n\n¿qué?"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(CORPUS)
    return p


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sp_tok(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / f"{request.param}.model"
    return train_sentencepiece([str(corpus)], 400, request.param, out)


def test_char_roundtrip_and_layout():
    tok = CharTokenizer.fit([CORPUS, UNICODE])
    assert tok.chars == sorted(set(CORPUS + UNICODE))
    assert tok.eos_id == len(tok.chars) == tok.vocab_size - 1 and tok.type == "char"
    for text in (CORPUS, UNICODE, ""):
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id]) == "ab"  # EOS renders as ""
    assert tok.decode(torch.tensor(tok.encode(UNICODE))) == UNICODE


def test_char_vectorised_encode_matches_reference():
    rng = random.Random(0)
    alphabet = [chr(c) for c in (list(range(32, 127)) + [233, 0x6771, 0x1F600, 0x10FFFF])]
    tok = CharTokenizer(sorted(alphabet))
    text = "".join(rng.choice(alphabet) for _ in range(5000))
    assert tok.encode(text) == tok.encode_ref(text)


def test_char_unknown_character_is_named():
    tok = CharTokenizer.fit(["abc"])
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 2"):
        tok.encode("abé")
    with pytest.raises(ValueError, match="U\\+1F600"):  # beyond the lookup table
        tok.encode("a😀")
    with pytest.raises(ValueError, match="outside the char vocabulary"):
        tok.decode([0, 99])


def test_byte_roundtrip_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [256] + tok.encode("x")) == UNICODE + "x"
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # truncated UTF-8 -> replacement char


def test_sentencepiece_roundtrip(sp_tok, tmp_path):
    assert sp_tok.vocab_size == 400 and sp_tok.split_safe
    assert sp_tok.id_to_piece(sp_tok.eos_id) == "</s>"
    for text in (CORPUS[:500], UNICODE, "  leading and trailing  \n"):
        assert sp_tok.decode(sp_tok.encode(text)) == text
    assert len(sp_tok.encode(CORPUS)) < len(CORPUS) / 2  # it actually merges
    batch = sp_tok.encode_batch([CORPUS[:100], UNICODE])
    assert [b.tolist() for b in batch] == [sp_tok.encode(CORPUS[:100]), sp_tok.encode(UNICODE)]
    back = load_tokenizer(sp_tok.save(tmp_path / "tok"))
    assert back == sp_tok and back.encode(UNICODE) == sp_tok.encode(UNICODE)


def test_shipped_model():
    tok = load_tokenizer(SHIPPED)
    assert tok.vocab_size == 2048 and tok.split_safe
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(text) / len(ids) > 2.5


@pytest.mark.parametrize("make", [lambda: CharTokenizer.fit([UNICODE]), ByteTokenizer])
def test_save_load_equal(make, tmp_path):
    tok = make()
    d = tok.save(tmp_path / "t")
    assert json.loads((d / "tokenizer.json").read_text())["type"] == tok.type
    back = load_tokenizer(d)
    assert type(back) is type(tok) and back == tok and back.fingerprint() == tok.fingerprint()
    assert back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
    assert back.encode(UNICODE) == tok.encode(UNICODE)


def test_fingerprint_tracks_vocabulary(corpus, tmp_path):
    a, b = CharTokenizer.fit(["abc"]), CharTokenizer.fit(["abcd"])
    assert a.fingerprint() == CharTokenizer.fit(["cab"]).fingerprint()
    assert a.fingerprint() != b.fingerprint() != ByteTokenizer().fingerprint()
    s1 = train_sentencepiece([str(corpus)], 400, "bpe", tmp_path / "a.model")
    s2 = train_sentencepiece([str(corpus)], 410, "bpe", tmp_path / "b.model")
    s3 = train_sentencepiece([str(corpus)], 400, "bpe", tmp_path / "c.model")
    assert s1.fingerprint() != s2.fingerprint()
    assert s1.fingerprint() == s3.fingerprint()  # training is deterministic
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "c.model").read_bytes()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown type 'wordpiece'"):
        load_tokenizer(tmp_path)
    d = CharTokenizer.fit(["abc"]).save(tmp_path / "c")
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["chars"].append("z")  # edited vocabulary no longer matches its fingerprint
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="fingerprint"):
        load_tokenizer(d)


def test_build_tokenizer(corpus, tmp_path):
    char = build_tokenizer(TokenizerConfig(type="char"), [str(corpus)])
    assert char.chars == sorted(set(CORPUS))
    assert isinstance(build_tokenizer(TokenizerConfig(type="byte"), [str(corpus)]), ByteTokenizer)
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"body": "xyz", "text": "q"}\n{"body": "w"}\n')
    assert build_tokenizer(TokenizerConfig(), [str(jl)], text_field="body").chars == ["w", "x", "y", "z"]
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer.path: .*missing\.model"):
        build_tokenizer(TokenizerConfig(type="sentencepiece", path=str(tmp_path / "missing.model")), [])
    with pytest.raises(ValueError, match=r"corpus\.txt.* is not a sentencepiece model"):
        build_tokenizer(TokenizerConfig(type="sentencepiece", path=str(corpus)), [])
    sp = build_tokenizer(TokenizerConfig(type="sentencepiece", path="tokenizers/shakespeare-bpe2048.model"), [])
    assert sp.vocab_size == 2048  # relative paths also resolve against the project root


def test_train_failure_leaves_nothing(corpus, tmp_path):
    out = tmp_path / "m.model"
    out.write_bytes(b"previous")
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece([str(corpus)], 50000, "bpe", out)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.model"]
    with pytest.raises(ValueError, match="--type"):
        train_sentencepiece([str(corpus)], 300, "wordpiece", out)
    with pytest.raises(FileNotFoundError, match="--input: file 'nope.txt' not found"):
        train_sentencepiece(["nope.txt"], 300, "bpe", out)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="seqlm")
    sub = parser.add_subparsers(dest="command")
    data_cli.add_commands(sub)
    return run_command(parser.parse_args(argv))


def test_cli_train_encode_decode(corpus, tmp_path, capsys):
    out = tmp_path / "tk" / "tiny.model"
    assert _cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "380", "--type", "unigram",
                 "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 380 and tok.decode(tok.encode(UNICODE)) == UNICODE
    capsys.readouterr()
    assert _cli(["tokenizer", "encode", "-t", str(out), "the quick fox"]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode("the quick fox")
    assert _cli(["tokenizer", "decode", "-t", str(out), *ids]) == 0
    assert capsys.readouterr().out == "the quick fox\n"
    ck = tmp_path / "ckpt"
    CharTokenizer.fit(["hello"]).save(ck / "tokenizer")  # a checkpoint directory works too
    assert _cli(["tokenizer", "info", "-t", str(ck)]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 5
    assert _cli(["tokenizer", "train", "--input", str(tmp_path / "none.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "x.model")]) == 2
    assert "none.txt" in capsys.readouterr().err and not (tmp_path / "x.model").exists()


def test_readme_command_reproduces_shipped_model(tmp_path):
    readme = (ROOT / "tokenizers" / "README.md").read_text()
    cmd = readme.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ").split()
    assert cmd[:3] == ["seqlm", "tokenizer", "train"]
    out = cmd.index("--out") + 1
    assert cmd[out] == "tokenizers/shakespeare-bpe2048.model"
    cmd[out] = str(tmp_path / "again.model")
    assert _cli(cmd[1:]) == 0
    assert (tmp_path / "again.model").read_bytes() == SHIPPED.read_bytes()
