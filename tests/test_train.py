"""Training loop: exact resume, atomic checkpoints, schedules, the train CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqlm.config import TrainConfig, parse_config
from seqlm.train.loop import train
from seqlm.train.schedule import lr_at

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


def tiny_cfg(tmp_path, out="run", model=None, **train_kw):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    t = {"seq_len": 16, "batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "dtype": "fp32",
         "out_dir": str(tmp_path / out), "log_every": 1, "progress": False}
    t.update(train_kw)
    return parse_config({
        "model": {"d_model": 32, "pattern": "*-", "n_layers": 2, "dropout": 0.1,
                  "block_defaults": {"attention": {"n_heads": 2}}, **(model or {})},
        "data": {"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
        "train": t,
        "eval": {"every": 3, "batches": 2, "sample_tokens": 8},
    })


def losses(out_dir):
    recs = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def test_resume_is_exact(tmp_path):
    straight = train(tiny_cfg(tmp_path, "a"))
    cfg_b = tiny_cfg(tmp_path, "b")
    half = train(cfg_b, stop_at=4)
    assert half["stopped"] and half["step"] == 4
    resumed = train(cfg_b, resume=True)
    assert resumed["step"] == 8
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 8
    wa = load_file(str(Path(straight["checkpoint"]) / "model.safetensors"))
    wb = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    assert Path(resumed["checkpoint"]) == tmp_path / "b" / "checkpoint" / "step-00000008"
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert straight["val_loss"] == resumed["val_loss"]
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0


def test_loss_goes_down_and_outputs_written(tmp_path):
    res = train(tiny_cfg(tmp_path, max_steps=40, **{"lr": 5e-3}))
    ls = [l for _, l in losses(tmp_path / "run")]
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3
    assert math.isclose(res["val_ppl"], math.exp(res["val_loss"]))
    ck = Path(res["checkpoint"])
    for f in ("config.yaml", "model.safetensors", "tokenizer", "trainer.safetensors", "trainer.json",
              "meta.json", "manifest.json"):
        assert (ck / f).exists(), f
    assert (tmp_path / "run" / "tb").is_dir()
    assert isinstance(res["sample"], str) and len(res["sample"]) > 0


def test_failed_checkpoint_leaves_previous_intact(tmp_path, monkeypatch):
    from seqlm.io import checkpoint as ck

    res = train(tiny_cfg(tmp_path, max_steps=2))
    path = Path(res["checkpoint"])
    before = (path / "model.safetensors").read_bytes()
    model, cfg, tok = ck.load_model(path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(path.parent, model, cfg, tok, step=3)
    assert (path / "model.safetensors").read_bytes() == before
    assert ck.resolve_checkpoint(path.parent) == path
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_schedules():
    c = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(99, c) == pytest.approx(0.1, abs=1e-3)
    vals = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    w = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, w) == 1.0 and lr_at(79, w) == 1.0 and lr_at(90, w) == pytest.approx(0.5)
    k = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, schedule="constant")
    assert lr_at(99, k) == 1.0


def test_train_cli(tmp_path, capsys):
    from seqlm.cli import main

    cfg = tiny_cfg(tmp_path, max_steps=3)
    from seqlm.config import save_config

    save_config(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "validation loss:" in out and "perplexity:" in out and "sample" in out
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_init_from_starts_a_fresh_run_from_trained_weights(tmp_path):
    from seqlm.io.checkpoint import CheckpointError

    first = train(tiny_cfg(tmp_path, "a", max_steps=4))
    w0 = load_file(str(Path(first["checkpoint"]) / "model.safetensors"))
    cfg = tiny_cfg(tmp_path, "b", max_steps=1, lr=1e-12, warmup_steps=0, weight_decay=0.0)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": first["checkpoint"]})})
    second = train(cfg)
    assert second["step"] == 1  # a fresh schedule, not a resume
    w1 = load_file(str(Path(second["checkpoint"]) / "model.safetensors"))
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-8)
    fresh = train(tiny_cfg(tmp_path, "c", max_steps=1, lr=1e-12, warmup_steps=0, weight_decay=0.0))
    wf = load_file(str(Path(fresh["checkpoint"]) / "model.safetensors"))
    assert not torch.allclose(wf["embed.weight"], w0["embed.weight"])  # init_from really mattered
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(tmp_path / "nope")})})
    with pytest.raises(CheckpointError, match="train.init_from"):
        train(bad)


def test_bf16_autocast_trains_every_ssm(tmp_path):
    """train.dtype=bf16 on CPU (autocast) with every SSM block in the stack: the loss stays
    finite and goes down (Mamba-1/Mamba-2 used to fail in their kernels' backward)."""
    cfg = tiny_cfg(tmp_path, model={"pattern": "2M-H*", "n_layers": 5}, max_steps=30, dtype="bf16", lr=5e-3)
    res = train(cfg)
    ls = [l for _, l in losses(tmp_path / "run")]
    assert all(math.isfinite(l) for l in ls) and math.isfinite(res["val_loss"])
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.2


def test_resume_keeps_the_runs_auto_dtype(tmp_path, monkeypatch, capsys):
    """``dtype: auto`` decides once per run: a resumed run reuses the recorded choice instead of
    probing again (a probe on a busier machine could pick the other precision mid-run)."""
    import seqlm.train.precision as prec

    answers = iter([(torch.bfloat16, "bf16 (probe 1)"), (None, "fp32 (probe 2)")])
    monkeypatch.setattr(prec, "choose_cpu_dtype", lambda *a, **k: next(answers))
    train(tiny_cfg(tmp_path, max_steps=4, dtype="auto"), stop_at=2)
    capsys.readouterr()
    res = train(tiny_cfg(tmp_path, max_steps=4, dtype="auto"), resume=True)
    out = capsys.readouterr().out
    assert "train.dtype auto -> bf16, as the run chose before the checkpoint" in out
    assert res["step"] == 4
    assert json.loads((Path(res["checkpoint"]) / "trainer.json").read_text())["amp"] == "bf16"
