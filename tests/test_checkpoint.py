"""Checkpoint I/O (seqlm/io/checkpoint.py): no code execution, no data loss, crash safety,
corruption detection, group-readable files, root / step / model-only resolution."""
import json
import os
import pickle
import re
import signal
import stat
from pathlib import Path

import pytest
import torch

from seqlm.config import parse_config
from seqlm.data.tokenizers import CharTokenizer
from seqlm.io import CheckpointError, build_model, load_model, save_checkpoint
from seqlm.io import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 20


def tiny(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    cfg = parse_config({"model": {"d_model": 16, "pattern": "*-", "block_defaults": {"attention": {"n_heads": 2}}},
                        "data": {"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
                        "train": {"out_dir": str(tmp_path / "run"), "progress": False}})
    tok = CharTokenizer.fit([TEXT])
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    return model, cfg, tok


def trainer_state(model, step=3):
    """A real AdamW state (after one step on a copy: the model itself is left alone)."""
    import copy

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99))
    m(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    opt.step()
    return {"step": step, "optimizer": opt.state_dict(),
            "rng": {"data": torch.Generator().manual_seed(1).get_state(), "torch": torch.get_rng_state(),
                    "cuda": []}, "bad_steps": 0}


def test_trainer_state_round_trips_without_pickle(tmp_path):
    model, cfg, tok = tiny(tmp_path)
    st = trainer_state(model)
    st["extra"] = {"nan": float("nan"), "tuple": (1, 2.5, None), 7: "int key", "nested": [torch.ones(2)]}
    d = save_checkpoint(tmp_path / "ck", model, cfg, tok, st, step=3)
    assert not (d / "trainer.pt").exists()
    back = ck.load_trainer_state(d)
    assert back["step"] == 3 and back["extra"]["tuple"] == (1, 2.5, None) and back["extra"][7] == "int key"
    assert back["extra"]["nan"] != back["extra"]["nan"]
    assert torch.equal(back["rng"]["torch"], st["rng"]["torch"]) and back["rng"]["torch"].dtype == torch.uint8
    o1, o2 = st["optimizer"], back["optimizer"]
    assert o1["param_groups"] == o2["param_groups"]
    assert o1["state"].keys() == o2["state"].keys()
    for k in o1["state"]:
        for n, v in o1["state"][k].items():
            assert torch.equal(v, o2["state"][k][n]) and v.dtype == o2["state"][k][n].dtype
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(back["optimizer"])  # the optimizer accepts it


def test_planted_pickle_never_runs(tmp_path):
    """Defect 1: a trainer.pt whose unpickling calls os.system ran on --resume."""
    from seqlm.train.loop import train

    model, cfg, tok = tiny(tmp_path)
    d = save_checkpoint(tmp_path / "run" / "checkpoint", model, cfg, tok, trainer_state(model), step=3)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for f in ("trainer.safetensors", "trainer.json", "manifest.json"):
        (d / f).unlink()
    (d / "trainer.pt").write_bytes(pickle.dumps({"step": Evil()}))
    with pytest.raises(CheckpointError, match="pickle"):
        train(cfg, resume=True)
    assert not marker.exists()


def test_no_pickle_loads_in_seqlm():
    bad = []
    for f in (ROOT / "seqlm").rglob("*.py"):
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.name}: {m.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", src, re.M):
            bad.append(f"{f.name}: imports pickle")
        if "pickle.load" in src or "weights_only=False" in src:
            bad.append(f"{f.name}: pickle.load / weights_only=False")
    assert not bad, bad


def test_refuses_to_replace_foreign_directory(tmp_path):
    """Defect 2: save_checkpoint deleted an unrelated file already in the target."""
    model, cfg, tok = tiny(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a seqlm checkpoint"):
        save_checkpoint(out, model, cfg, tok)
    assert (out / "notes.txt").read_text() == "precious"
    d = save_checkpoint(tmp_path / "single", model, cfg, tok)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save_checkpoint(d, model, cfg, tok)
    (d / "notes.txt").unlink()
    assert save_checkpoint(d, model, cfg, tok) == d  # an earlier seqlm checkpoint is replaced
    load_model(d)
    root = tmp_path / "root"
    save_checkpoint(root, model, cfg, tok, step=1)
    with pytest.raises(CheckpointError, match="checkpoint root"):
        save_checkpoint(root, model, cfg, tok)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_convert_never_touches_its_input(tmp_path):
    from seqlm.cli import main

    model, cfg, tok = tiny(tmp_path)
    root = tmp_path / "run" / "checkpoint"
    d = save_checkpoint(root, model, cfg, tok, trainer_state(model), step=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (root, d, tmp_path / "run", d / "sub"):
        assert main(["convert", "recursive", "--checkpoint", str(root), "--groups", "2", "--rank", "2",
                     "--out", str(out)]) == 2
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert main(["convert", "recursive", "--checkpoint", str(root), "--groups", "2", "--rank", "2",
                 "--out", str(tmp_path / "conv")]) == 0
    load_model(tmp_path / "conv")


def test_layout_latest_pruning_and_resolution(tmp_path):
    model, cfg, tok = tiny(tmp_path)
    root = tmp_path / "ck"
    for s in (1, 2, 3, 4):
        last = save_checkpoint(root, model, cfg, tok, trainer_state(model, s), step=s, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    assert (root / "latest").read_text().strip() == "step-00000004" and last == root / "step-00000004"
    assert ck.resolve_checkpoint(root) == last and ck.resolve_checkpoint(last) == last
    assert ck.read_meta(root)["step"] == 4
    (root / "latest").unlink()  # a missing pointer: the newest complete step directory
    assert ck.resolve_checkpoint(root) == last
    (root / "latest").write_text("step-00000099\n")  # a stale pointer: same
    assert ck.resolve_checkpoint(root) == last
    # a leftover temp dir of a dead process is removed by the next save; never resolved
    stale = root / ".step-00000005.tmp-999999999-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert ck.resolve_checkpoint(root) == last
    save_checkpoint(root, model, cfg, tok, step=5, keep_last=2)
    assert not stale.exists()
    with pytest.raises(CheckpointError, match="no such directory"):
        ck.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path / "empty")


def test_files_follow_the_umask(tmp_path):
    """Defect 11: checkpoints were owner-only (0700 / 0600)."""
    model, cfg, tok = tiny(tmp_path)
    old = os.umask(0o002)
    try:
        d = save_checkpoint(tmp_path / "ck", model, cfg, tok, trainer_state(model), step=1)
        s = save_checkpoint(tmp_path / "single", model, cfg, tok)
    finally:
        os.umask(old)
    for p in [d, d.parent, s, *d.rglob("*"), *s.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o775 if p.is_dir() else 0o664), (p, oct(mode))


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x10
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["truncate-weights", "flip-weights", "flip-trainer", "corrupt-json",
                                    "truncate-tokenizer", "delete-config", "corrupt-manifest"])
def test_corruption_is_detected(tmp_path, damage, capsys):
    """Truncated / bit-flipped files: one CheckpointError naming the file (CLI: one line, exit 2)."""
    from seqlm.cli import main

    model, cfg, tok = tiny(tmp_path)
    d = save_checkpoint(tmp_path / "ck", model, cfg, tok, trainer_state(model), step=1)
    w = d / "model.safetensors"
    name = {"truncate-weights": "model.safetensors", "flip-weights": "model.safetensors",
            "flip-trainer": "trainer.safetensors", "corrupt-json": "trainer.json",
            "truncate-tokenizer": "tokenizer/tokenizer.json", "delete-config": "config.yaml",
            "corrupt-manifest": "manifest.json"}[damage]
    if damage == "truncate-weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "flip-weights":
        _flip(w, w.stat().st_size - 5)
    elif damage == "flip-trainer":
        _flip(d / "trainer.safetensors", (d / "trainer.safetensors").stat().st_size - 3)
    elif damage == "corrupt-json":
        (d / "trainer.json").write_text((d / "trainer.json").read_text().replace("step", "stop", 1))
    elif damage == "truncate-tokenizer":
        t = d / "tokenizer" / "tokenizer.json"
        t.write_bytes(t.read_bytes()[:10])
    elif damage == "delete-config":
        (d / "config.yaml").unlink()
    else:
        (d / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(name)):
        if damage in ("flip-trainer", "corrupt-json"):
            ck.load_trainer_state(d)
        else:
            load_model(d)
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "the", "--max-new-tokens", "2"]) == (
        0 if damage in ("flip-trainer", "corrupt-json") else 2)
    err = capsys.readouterr().err
    if damage not in ("flip-trainer", "corrupt-json"):
        assert err.count("\n") == 1 and name.split("/")[0] in err and "Traceback" not in err


def test_unverified_truncated_weights_give_checkpoint_error(tmp_path):
    """Defect 8: a truncated model.safetensors (no manifest: an older or foreign checkpoint) raised
    SafetensorError through the CLI."""
    model, cfg, tok = tiny(tmp_path)
    d = save_checkpoint(tmp_path / "ck", model, cfg, tok)
    (d / "manifest.json").unlink()
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d)


def test_write_error_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full in the middle of a save: the previous checkpoint stays the loadable latest,
    no temp directory is left, and the error says so."""
    import errno

    from seqlm import fsutil

    model, cfg, tok = tiny(tmp_path)
    root = tmp_path / "ck"
    first = save_checkpoint(root, model, cfg, tok, trainer_state(model, 1), step=1)
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    real = fsutil.write_bytes

    def full(path, data, sync=True):
        if Path(path).name == "trainer.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, sync)

    monkeypatch.setattr(fsutil, "write_bytes", full)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ck.CheckpointWriteError, match="disk full.*previous checkpoint .*step-00000001.* intact"):
        save_checkpoint(root, model, cfg, tok, trainer_state(model, 2), step=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert ck.resolve_checkpoint(root) == first
    load_model(root)


def _fork_save(root, model, cfg, tok, step, fault_at):
    """Save in a forked child that SIGKILLs itself at the fault_at-th file-system step."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.environ["SEQLM_FAULT_AT"] = str(fault_at)
            from seqlm import fsutil
            fsutil._count = 0
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
            save_checkpoint(root, model, cfg, tok, trainer_state(model, step), step=step, keep_last=1)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_sigkill_at_every_step_of_a_save(tmp_path, monkeypatch):
    """Defect 3: kill the process before each write / fsync / rename / remove of a save in
    turn; after each kill the newest complete checkpoint loads (the old one or the new one,
    never a mix), and no partial directory is visible."""
    from seqlm import fsutil

    model, cfg, tok = tiny(tmp_path)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SEQLM_FAULT_TRACE", str(trace))
    root0 = tmp_path / "probe"
    save_checkpoint(root0, model, cfg, tok, trainer_state(model, 1), step=1, keep_last=1)
    fsutil._count = 0
    trace.unlink()
    save_checkpoint(root0, model, cfg, tok, trainer_state(model, 2), step=2, keep_last=1)
    ops = trace.read_text().splitlines()
    monkeypatch.delenv("SEQLM_FAULT_TRACE")
    kinds = {ln.split()[1] for ln in ops}
    assert {"write", "fsync", "rename", "remove"} <= kinds and len(ops) >= 15
    new = {k: v.clone() for k, v in model.state_dict().items()}
    killed = 0
    for at in range(1, len(ops) + 2):
        root = tmp_path / f"r{at}"
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
        save_checkpoint(root, model, cfg, tok, trainer_state(model, 1), step=1, keep_last=1)
        old = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(new)
        killed += _fork_save(root, model, cfg, tok, 2, at)
        d = ck.resolve_checkpoint(root)
        assert d.name in ("step-00000001", "step-00000002"), at
        got, _, _ = load_model(root)  # verified against the manifest
        want = old if d.name == "step-00000001" else new
        for k, v in got.state_dict().items():
            assert torch.equal(v, want[k]), (at, k)
        assert ck.load_trainer_state(root)["step"] == int(d.name[-1])
        visible = [p.name for p in root.iterdir() if not p.name.startswith(".")]
        assert set(visible) <= {"latest", "step-00000001", "step-00000002"}, (at, visible)
        save_checkpoint(root, model, cfg, tok, trainer_state(model, 3), step=3, keep_last=1)  # resume saves
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000003"], at
    assert killed == len(ops)  # every step was hit; the last run completed
