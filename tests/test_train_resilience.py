"""The training loop under crashes, signals, full disks and non-finite losses: kill anywhere,
resume exactly (CPU fp32, bit-identical weights)."""
import errno
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqlm.config import parse_config
from seqlm.io import CheckpointError
from seqlm.io import checkpoint as ck
from seqlm.train.loop import NonFiniteLossError, train

TEXT = "".join(f"line {i}: pack my box with five dozen liquor jugs.\n" for i in range(300))


def cfg_for(tmp_path, out, **train_kw):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    t = {"seq_len": 16, "batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "threads": 1, "dtype": "fp32",
         "out_dir": str(tmp_path / out), "log_every": 1, "progress": False}
    t.update(train_kw)
    return parse_config({
        "model": {"d_model": 16, "pattern": "*-", "dropout": 0.1, "block_defaults": {"attention": {"n_heads": 2}}},
        "data": {"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
        "train": t, "eval": {"every": 0, "batches": 1, "sample_tokens": 0},
    })


def losses(out_dir):
    recs = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def weights(res):
    return load_file(str(Path(res["checkpoint"]) / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _signal_on_batch(monkeypatch, n, sig):
    """Deliver ``sig`` to this process while the n-th training batch is drawn."""
    from seqlm.data.dataset import TokenData

    real, calls = TokenData.get_batch, {"n": 0}

    def get_batch(self, split, *a, **k):
        if split == "train":
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), sig)
        return real(self, split, *a, **k)

    monkeypatch.setattr(TokenData, "get_batch", get_batch)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_at_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, sig):
    """Defect 4 (Ctrl-C on the 2nd micro-batch of step 5 with grad_accum=2 resumed with other
    losses) and defect 10 (SIGTERM with checkpoint_every: 0 saved nothing)."""
    straight = train(cfg_for(tmp_path, "a", grad_accum=2))
    with monkeypatch.context() as m:
        _signal_on_batch(m, 10, sig)  # step 5 (1-based), second micro-batch
        half = train(cfg_for(tmp_path, "b", grad_accum=2))
    assert half["stopped"] and half["signal"] == sig.name and half["step"] == 5
    assert ck.read_meta(tmp_path / "b" / "checkpoint")["interrupted"] == sig.name
    assert signal.getsignal(sig) is not None  # handlers restored
    done = train(cfg_for(tmp_path, "b", grad_accum=2), resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert_same_weights(weights(straight), weights(done))


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    """Defect 10: --resume on an out_dir without a checkpoint yet failed."""
    from seqlm.cli import main
    from seqlm.config import save_config

    save_config(cfg_for(tmp_path, "run", max_steps=3), tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--resume", "--stop-at", "2"]) == 0
    assert "starting a fresh run" in capsys.readouterr().out
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--resume"]) == 0  # the same command resumes
    out = capsys.readouterr().out
    assert "resuming from" in out and "step-00000002" in out
    assert ck.read_meta(tmp_path / "run" / "checkpoint")["step"] == 3
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--resume", str(tmp_path / "nope")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    from seqlm.model import LM

    real, calls = LM.loss, {"n": 0}

    def loss(self, x, y):
        calls["n"] += 1
        out = real(self, x, y)
        return out * float("nan") if calls["n"] in bad else out

    monkeypatch.setattr(LM, "loss", loss)
    bad = {3, 4}  # steps 3 and 4: skipped, the run goes on
    res = train(cfg_for(tmp_path, "a", max_steps=6, max_bad_steps=2, checkpoint_every=2))
    assert res["step"] == 6 and res["bad_steps"] == 2 and math.isfinite(res["val_loss"])
    recs = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "skip"] == [3, 4]
    assert recs[-2]["kind"] == "train" and recs[-2]["bad_steps"] == 2

    calls["n"], bad = 0, set(range(4, 100))  # from step 4 on: stop after 3 bad steps in a row
    with pytest.raises(NonFiniteLossError, match=r"train.max_bad_steps: 3 consecutive steps \(4..6\)"):
        train(cfg_for(tmp_path, "b", max_steps=10, max_bad_steps=2, checkpoint_every=2))
    d = ck.resolve_checkpoint(tmp_path / "b" / "checkpoint")
    assert d.name == "step-00000003" and ck.read_meta(d)["stopped"] == "non-finite loss"
    model, _, _ = ck.load_model(d)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    bad = set()  # the checkpoint holds the state before the problem: that of a run stopped at step 3
    ref = train(cfg_for(tmp_path, "c", max_steps=10), stop_at=3)
    assert_same_weights(load_file(str(d / "model.safetensors")), weights(ref))


def test_disk_full_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    from seqlm.cli import main
    from seqlm.config import save_config
    from seqlm import fsutil

    save_config(cfg_for(tmp_path, "run", max_steps=6, checkpoint_every=2), tmp_path / "c.yaml")
    real = fsutil.write_bytes

    def write(path, data, sync=True):
        if Path(path).name == "meta.json" and ".step-00000004." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, sync)

    monkeypatch.setattr(fsutil, "write_bytes", write)
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full" in err and "step-00000002" in err and "intact" in err
    root = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    ck.load_model(root)
    monkeypatch.setattr(fsutil, "write_bytes", real)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--resume"]) == 0


def _child(fn):
    """Run fn() in a forked child; returns the pid. The child never returns to pytest."""
    pid = os.fork()
    if pid == 0:
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                os.dup2(null.fileno(), 2)
            torch.set_num_threads(1)
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    return pid


def test_kill_anywhere_resume_exactly(tmp_path):
    """SIGKILL at file-system steps of checkpoint saves (deterministic: SEQLM_FAULT_AT) and at
    random moments, resuming with --resume after each; the final weights and every logged
    loss equal an uninterrupted run's, bit for bit."""
    from seqlm import fsutil

    kw = dict(max_steps=24, checkpoint_every=3, keep_last=2)
    straight = train(cfg_for(tmp_path, "a", **kw))
    cfg = cfg_for(tmp_path, "b", **kw)
    rng = random.Random(0)
    # a save is 22 file-system steps (+2 when it prunes): 3 = the weights' write, 17 = the step
    # directory's rename, 21 = the `latest` rename, 23 = a prune or the next save's first write,
    # 39 = the second save's rename, 44 = its final directory fsync (counted per process)
    plan = [("fault", at) for at in (3, 17, 21, 23, 39, 44)]
    plan += [("random", None)] * 3
    kills, status = 0, None
    for kind, at in plan + [("finish", None)]:
        def run():
            fsutil._count = 0
            if kind == "fault":
                os.environ["SEQLM_FAULT_AT"] = str(at)
            train(cfg, resume=True)
        pid = _child(run)
        if kind == "random":
            time.sleep(rng.uniform(0.2, 1.5))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL
            kills += 1
            d = ck.find_checkpoint(tmp_path / "b" / "checkpoint")
            if d is not None:  # after each kill the newest checkpoint loads
                ck.load_model(d)
                assert ck.load_trainer_state(d)["step"] == ck.read_meta(d)["step"]
        else:
            assert os.WEXITSTATUS(status) == 0, (kind, at)
    assert kills >= 5
    final = ck.resolve_checkpoint(tmp_path / "b" / "checkpoint")
    assert ck.read_meta(final)["step"] == 24
    assert_same_weights(weights(straight), load_file(str(final / "model.safetensors")))
    assert_same_weights(load_file(str(Path(straight["checkpoint"]) / "trainer.safetensors")),
                        load_file(str(final / "trainer.safetensors")))  # optimizer moments, RNG states
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert not [p for p in (tmp_path / "b" / "checkpoint").iterdir() if p.name.startswith(".")]


def test_resume_rejects_a_trainer_state_that_does_not_fit(tmp_path):
    res = train(cfg_for(tmp_path, "a", max_steps=2))
    d = Path(res["checkpoint"])
    js = json.loads((d / "trainer.json").read_text())
    js["optimizer"]["param_groups"] = []
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").unlink()
    (d / "trainer.json").write_text(json.dumps(js))
    with pytest.raises(CheckpointError, match="trainer state does not fit"):
        train(cfg_for(tmp_path, "a", max_steps=4), resume=True)
    del man
