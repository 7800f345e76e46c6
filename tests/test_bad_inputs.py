"""Bad inputs through the CLI: one clear message on stderr naming the file or field and a
non-zero exit, never a traceback; data that changes between runs rebuilds the cache; a
non-editable install ships the default config."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seqlm.cli import main
from seqlm.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"line {i}: sphinx of black quartz, judge my vow.\n" for i in range(200))


def write_cfg(tmp_path, data_file, **train):
    from seqlm.config import parse_config

    t = {"seq_len": 16, "batch_size": 2, "max_steps": 3, "out_dir": str(tmp_path / "run"), "progress": False,
         "warmup_steps": 1, **train}
    cfg = parse_config({"model": {"d_model": 16, "pattern": "*-", "block_defaults": {"attention": {"n_heads": 2}}},
                        "data": {"files": [str(data_file)], "cache_dir": str(tmp_path / "cache")},
                        "train": t, "eval": {"every": 0, "batches": 1, "sample_tokens": 0}})
    save_config(cfg, tmp_path / "c.yaml")
    return str(tmp_path / "c.yaml")


def one_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("seqlm") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("name,content,needle", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\n", "is empty"),
    ("binary.txt", bytes(range(256)) * 4, "UTF-8"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 50, "not valid UTF-8"),
    ("binary.jsonl", b"\x00\xff\xfe" * 100, "UTF-8"),
    ("nofield.jsonl", b'{"body": "x"}\n', "no record has the field"),
])
def test_bad_data_files(tmp_path, capsys, name, content, needle):
    f = tmp_path / name
    f.write_bytes(content)
    assert main(["train", "--config", write_cfg(tmp_path, f)]) == 2
    one_error(capsys, name, needle)


def test_data_changed_or_deleted_between_runs(tmp_path, capsys):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    cfg = write_cfg(tmp_path, f, max_steps=4)
    assert main(["train", "--config", cfg, "--stop-at", "2"]) == 0
    caches = {p.name: p.read_bytes() for p in (tmp_path / "cache").glob("*.bin")}
    f.write_text(TEXT[::-1])  # same characters, new content: the cache is rebuilt, resume works
    assert main(["train", "--config", cfg, "--resume"]) == 0
    now = {p.name: p.read_bytes() for p in (tmp_path / "cache").glob("*.bin")}
    assert now != caches and len(now) >= 1
    capsys.readouterr()
    f.write_text(TEXT + "Zebra!\n")  # a character the checkpoint's tokenizer never saw
    assert main(["train", "--config", cfg, "--resume", "train.max_steps=6"]) == 2
    one_error(capsys, "corpus.txt", "'Z'", "not in the vocabulary")
    f.unlink()
    assert main(["train", "--config", cfg, "--resume", "train.max_steps=6"]) == 2
    one_error(capsys, "corpus.txt", "not found")


def test_wrong_config_checkpoint(tmp_path, capsys):
    """A checkpoint of one model resumed / loaded with another model's config."""
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    cfg = write_cfg(tmp_path, f)
    assert main(["train", "--config", cfg, "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--resume", "model.d_model=24"]) == 2
    one_error(capsys, "weights do not fit")
    ck = tmp_path / "run" / "checkpoint"
    assert main(["eval", "ppl", "--checkpoint", str(ck), "--data", str(f), "--context", "16"]) == 0
    capsys.readouterr()
    step = next(ck.glob("step-*"))
    (step / "config.yaml").write_text("model: {d_model: -1}\n")
    assert main(["eval", "ppl", "--checkpoint", str(ck), "--data", str(f), "--context", "16"]) == 2
    one_error(capsys, "config.yaml")


def test_default_config_is_package_data(tmp_path):
    """Defect 9: DEFAULT_CONFIG was found through parents[2] (the source tree); a non-editable
    install fell back to a 2-layer '*-' model. The default config now ships inside the package
    (pyproject package-data) and equals configs/default.yaml; an installed copy of the package
    (simulated: seqlm/ alone on sys.path, run from an empty directory) trains the documented
    hybrid, and a missing data file names itself and explains where it was looked up."""
    from seqlm.train.cli import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.read_bytes() == (ROOT / "configs" / "default.yaml").read_bytes(), \
        "seqlm/configs/default.yaml must be a copy of configs/default.yaml (cp configs/default.yaml seqlm/configs/)"
    assert 'seqlm = ["configs/*.yaml"]' in (ROOT / "pyproject.toml").read_text()
    site = tmp_path / "site"
    shutil.copytree(ROOT / "seqlm", site / "seqlm", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import seqlm, sys\nfrom seqlm.train.cli import DEFAULT_CONFIG\nfrom seqlm.config import load_config\n"
            "from seqlm.cli import main\nc = load_config(DEFAULT_CONFIG)\n"
            "print(seqlm.__file__, c.model.n_layers, ''.join(l.type[0] for l in c.model.layers))\n"
            "sys.exit(main(['train', 'train.max_steps=1']))\n")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    first = out.stdout.splitlines()[0].split()
    assert first[0].startswith(str(site)) and first[1] == "14", out.stdout
    assert first[2] == "".join(l.type[0] for l in load_config(ROOT / "configs" / "default.yaml").model.layers)
    assert out.returncode == 2 and "tinyshakespeare.txt" in out.stderr and "installed package" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1


def test_tokenizer_that_does_not_match_the_data_cache(tmp_path, capsys):
    """A cache built with one tokenizer is never read with another: another tokenizer gets its
    own cache (the key holds the fingerprint), and a cache whose metadata was swapped in from
    another tokenizer is rebuilt instead of being trusted."""
    import json

    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    cfg = write_cfg(tmp_path, f, max_steps=1)
    assert main(["train", "--config", cfg]) == 0
    char = {p.name for p in (tmp_path / "cache").glob("*.json")}
    assert main(["train", "--config", cfg, "data.tokenizer.type=byte", f"train.out_dir={tmp_path / 'b'}"]) == 0
    both = {p.name for p in (tmp_path / "cache").glob("*.json")}
    assert len(both - char) == 1
    (c,), (b,) = char, both - char
    meta_b = json.loads((tmp_path / "cache" / b).read_text())
    (tmp_path / "cache" / c).write_text(json.dumps(meta_b))  # the char cache now claims the byte tokenizer
    capsys.readouterr()
    assert main(["train", "--config", cfg, f"train.out_dir={tmp_path / 'c'}"]) == 0
    assert json.loads((tmp_path / "cache" / c).read_text())["key"] != meta_b["key"]  # rebuilt
