"""MQAR from the command line (train on ``data.task``, then ``seqlm eval mqar``) and the
small user-facing fixes: the sample echoes its prompt, plot titles name the run, --threads,
``seqlm --help`` lists only commands that exist."""
import argparse
import json
import math

import torch
import yaml

from seqlm.cli import build_parser, main
from seqlm.eval.cli import run_name, set_threads


def test_mqar_train_then_eval_cli(tmp_path, capsys):
    V, L, k = 32, 16, 2
    cfg = {"model": {"d_model": 32, "pattern": "*-*-", "block_defaults": {"attention": {"n_heads": 2}}},
           "data": {"task": {"type": "mqar", "num_pairs": k, "vocab_size": V, "n_train": 2000, "n_val": 200}},
           "train": {"seq_len": L, "batch_size": 32, "max_steps": 150, "lr": 3e-3, "warmup_steps": 10,
                     "out_dir": str(tmp_path / "mqar"), "progress": False, "threads": 1},
           "eval": {"every": 0, "batches": 4, "sample_tokens": 4}}
    path = tmp_path / "mqar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "-c", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{\n"):])  # the JSON object (a dtype note may precede it)
    # the loss is over the k labelled positions only: chance is ln(V/2) (values are the upper half)
    assert res["val_loss"] < math.log(V / 2), res["val_loss"]
    ck = tmp_path / "mqar" / "checkpoint"
    assert main(["eval", "mqar", "--checkpoint", str(ck), "--settings", f"{L},{k}", "--num-examples", "200",
                 "--threads", "1", "--out", str(tmp_path / "ev")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["vocab_size"] == V and len(out["accuracy"]) == 1
    assert out["accuracy"][0] > 4 / V  # above chance (2/V over the value half)
    assert (tmp_path / "ev" / "mqar.json").exists()


def test_task_config_errors_name_the_field(tmp_path, capsys):
    cfg = {"data": {"task": {"type": "mqar", "num_pairs": 9, "vocab_size": 64}},
           "train": {"seq_len": 16, "max_steps": 1, "out_dir": str(tmp_path / "x"), "progress": False}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "-c", str(path)]) != 0
    err = capsys.readouterr().err
    assert "data.task" in err and "num_pairs" in err and len(err.strip().splitlines()) == 1


def test_end_of_training_sample_echoes_its_prompt(tmp_path):
    from seqlm.train.loop import train
    from tests.test_train import tiny_cfg

    cfg = tiny_cfg(tmp_path, max_steps=2)
    cfg.eval.sample_prompt = "the "
    res = train(cfg)
    assert res["sample"].startswith("the ") and len(res["sample"]) > len("the ")


def test_titles_name_the_run_not_the_checkpoint_folder(tmp_path):
    (tmp_path / "my_run" / "checkpoint").mkdir(parents=True)
    assert run_name(tmp_path / "my_run" / "checkpoint") == "my_run"
    assert run_name(tmp_path / "my_run") == "my_run"


def test_threads_option_is_applied_and_checked():
    before = torch.get_num_threads()
    try:
        set_threads(argparse.Namespace(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    import pytest

    with pytest.raises(ValueError, match="--threads"):
        set_threads(argparse.Namespace(threads=0))
    for cmd in (["eval", "ppl"], ["generate"], ["eval", "mqar"], ["eval", "passkey"]):
        help_text = _help(cmd)
        assert "--threads" in help_text, cmd


def _help(cmd):
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    node = sub.choices[cmd[0]]
    if len(cmd) > 1:
        node = next(a for a in node._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd[1]]
    return node.format_help()


def test_help_lists_only_existing_commands():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    text = p.format_help()
    for word in ("distill",):
        assert (word in text) == (word in sub.choices), word
