"""Distributed training on DeepSpeed with real multi-process runs (2 CPU ranks over gloo):
the TP=2 loss curve follows single-process training, stop + --resume continues exactly,
a planted pickle in DeepSpeed's checkpoint never runs (the resume stops naming the file),
consolidated checkpoints load at TP=1, TP=2 and TP=4 (4 ranks) with identical logits and a
TP=4 run writes one that TP=1 loads, ZeRO-2 over 2 DP ranks matches one process with the
same global batch (through the `deepspeed` launcher), and a killed or hung rank ends the
job within the timeout naming the rank."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqlm.config import load_config
from seqlm.io import find_checkpoint, load_model, read_meta
from seqlm.io.checkpoint import CheckpointError
from test_parallel import ROOT, free_port, run_ranks

BIN = Path(sys.executable).parent
YAML = """
model:
  d_model: 32
  pattern: "2-*-M-H-"
  block_defaults:
    attention: {{n_heads: 8, n_kv_heads: 4}}  # GQA; every block below also splits 4 ways
    mamba2: {{d_state: 8, head_dim: 8, chunk_size: 16}}
    mamba: {{d_state: 4, chunk_size: 16}}
    h3: {{d_state: 8, head_dim: 2}}
data:
  files: [{corpus}]
  tokenizer: {{type: char}}
  cache_dir: {cache}
train:
  seq_len: 32
  batch_size: 4
  max_steps: 20
  warmup_steps: 2
  lr: 3.0e-3
  dtype: fp32  # auto probes bf16 speed per process: not deterministic across runs
  out_dir: {out}
  log_every: 1
  progress: false
eval: {{every: 0, batches: 2, sample_tokens: 0}}
"""


def env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def losses(out):
    return [r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    corpus = d / "corpus.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000])
    cfg = d / "c.yaml"
    cfg.write_text(YAML.format(corpus=corpus, cache=d / "cache", out=d / "ref"))
    from seqlm.train.loop import train

    train(load_config(cfg))  # the single-process reference (no launcher: the plain loop)
    return d, cfg


def torchrun(args, timeout=300, nproc=2, **kw):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def tp2(setup):
    d, cfg = setup
    a = torchrun(["-c", str(cfg), f"train.out_dir={d / 'A'}", "distributed.tp_size=2"])
    assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-4000:]
    train = ROOT / "train.py"
    for extra in (["--stop-at", "10"], ["--resume"]):
        rcs, logs = run_ranks(train, ["-c", cfg, f"train.out_dir={d / 'B'}", "distributed.tp_size=2", *extra])
        assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
    return d


def test_tp2_follows_single_process(setup, tp2):
    d, _ = setup
    ref, a = losses(d / "ref"), losses(d / "A")
    assert len(ref) == len(a) == 20
    assert max(abs(x - y) for x, y in zip(ref, a)) <= 1e-4, (ref, a)
    assert json.loads((d / "A" / "deepspeed_config.json").read_text())["train_batch_size"] == 4  # micro x accum x dp=1


def test_tp2_stop_and_resume_continues_exactly(tp2):
    a, b = losses(tp2 / "A"), losses(tp2 / "B")
    assert len(b) == 20 and (tp2 / "B" / "ds_checkpoint" / "latest").exists()
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)


def test_planted_pickle_in_deepspeed_checkpoint_never_runs(setup, tp2):
    """DeepSpeed's checkpoint is torch.save pickles: --resume reads it through torch's
    restricted unpickler only, so a planted os.system stops both ranks naming the file."""
    from seqlm.parallel.engine import safe_load

    d, cfg = setup
    run = d / "P"
    shutil.copytree(tp2 / "B", run)
    marker = d / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = run / "ds_checkpoint" / "step10" / "mp_rank_01_model_states.pt"
    torch.save({"module": Evil(), "step": 10}, evil)
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt.*posix.system"):
        safe_load(evil)  # the loader DeepSpeed is given, on its own
    rcs, logs = run_ranks(ROOT / "train.py", ["-c", cfg, f"train.out_dir={run}", "distributed.tp_size=2",
                                              "--resume", run / "checkpoint" / "step-00000010"])
    assert rcs == [2, 2], "\n".join(l[-3000:] for l in logs)
    for log in logs:  # both ranks refuse before loading anything: one line naming the file
        last = log.strip().splitlines()[-1]
        assert str(evil) in last and "posix.system" in last and "Traceback" not in log, log[-3000:]
    assert not marker.exists()


def test_checkpoints_load_at_tp1_and_tp2(setup, tp2):
    d, _ = setup
    ckpts = [str(d / "A" / "checkpoint"), str(d / "ref" / "checkpoint")]  # saved at TP=2, at TP=1
    out = d / "logits.json"
    rcs, logs = run_ranks(ROOT / "tests" / "dist" / "ckpt_logits.py", [out, *ckpts])
    assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
    at_tp2 = json.loads(out.read_text())
    for ck in ckpts:
        model, _, tok = load_model(ck)  # TP=1, single process
        x = torch.arange(40).remainder(tok.vocab_size).view(2, 20)
        with torch.no_grad():
            ref = model(x)[0]
        torch.testing.assert_close(torch.tensor(at_tp2[ck]), ref, rtol=0, atol=1e-5)
    # the TP=2 run's consolidated weights are the trained model (== single-process training)
    wa = load_model(ckpts[0])[0].state_dict()
    for k, v in load_model(ckpts[1])[0].state_dict().items():
        torch.testing.assert_close(wa[k], v, rtol=0, atol=1e-4)


def test_tp4_loads_tp2_and_tp1_checkpoints_and_writes_one_tp1_loads(setup, tp2):
    """A model trained at TP=2 (and one trained in one process) loads at TP=4 with the
    TP=1 logits; a run at TP=4 follows the single-process loss curve and writes a
    consolidated checkpoint that TP=1 loads: its logits equal TP=4's, and its val loss equals
    the one the TP=4 run computed sharded."""
    from seqlm.data.dataset import load_data
    from seqlm.train.loop import estimate_loss

    d, cfg = setup
    r = torchrun(["-c", str(cfg), f"train.out_dir={d / 'F'}", "distributed.tp_size=4", "train.max_steps=3"], nproc=4)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ref, f = losses(d / "ref"), losses(d / "F")
    assert len(f) == 3 and max(abs(x - y) for x, y in zip(ref, f)) <= 1e-4, (ref, f)  # same LR: warmup 2
    ckpts = [str(d / "A" / "checkpoint"), str(d / "ref" / "checkpoint"), str(d / "F" / "checkpoint")]
    out = d / "logits4.json"
    rcs, logs = run_ranks(ROOT / "tests" / "dist" / "ckpt_logits.py", [out, *ckpts], world=4)
    assert rcs == [0] * 4, "\n".join(l[-3000:] for l in logs)
    at_tp4 = json.loads(out.read_text())
    for ck in ckpts:
        model, mcfg, tok = load_model(ck)  # TP=1, single process
        x = torch.arange(40).remainder(tok.vocab_size).view(2, 20)
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(at_tp4[ck]), model(x)[0], rtol=0, atol=1e-5)
    model, mcfg, tok = load_model(ckpts[2])
    data = load_data(mcfg.data, tok, seq_len=mcfg.train.seq_len)
    val = estimate_loss(model, data, mcfg, torch.device("cpu"), None)
    assert abs(val - read_meta(find_checkpoint(ckpts[2]))["val_loss"]) <= 1e-5


def test_zero2_dp2_matches_one_process_same_global_batch(setup):
    d, cfg = setup
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "train.py"),
           "-c", str(cfg), f"train.out_dir={d / 'Z'}", "distributed.zero_stage=2", "train.batch_size=2"]
    r = subprocess.run(cmd, env=env(), cwd=d, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    ref, z = losses(d / "ref"), losses(d / "Z")  # ref: batch 4 in one process; Z: 2 ranks x 2
    assert len(z) == 20 and max(abs(x - y) for x, y in zip(ref, z)) <= 1e-4, (ref, z)
    conf = json.loads((d / "Z" / "deepspeed_config.json").read_text())
    assert conf["zero_optimization"]["stage"] == 2 and conf["train_batch_size"] == 4
    # every file of its DeepSpeed checkpoint (ZeRO partitions too) reads through the allowlist
    from seqlm.parallel.engine import check_ds_checkpoint, safe_load

    tag = d / "Z" / "ds_checkpoint" / "step20"
    check_ds_checkpoint(tag)
    files = sorted(tag.glob("*.pt"))
    assert len(files) == 3 and all(safe_load(f)["ds_version"] for f in files)  # model + 2 ZeRO partitions


def _rank_pid(parent: int, rank: int) -> int:
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        envs = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in envs:
            return int(child)
    raise AssertionError("rank process not found")


def _wait_steps(out: Path, proc, n=2, limit=120):
    t = time.time()
    while time.time() - t < limit and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= n:
            return
        time.sleep(0.3)
    raise AssertionError("training did not start")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_killed_rank_ends_job_naming_it(setup):
    d, cfg = setup
    out = d / "K"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "train.py"),
           "-c", str(cfg), f"train.out_dir={out}", "train.max_steps=100000", "distributed.timeout_s=20"]
    p = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_steps(out, p)
        os.kill(_rank_pid(p.pid, 1), signal.SIGKILL)
        t = time.time()
        _, err = p.communicate(timeout=60)
        assert time.time() - t < 40 and p.returncode != 0
        assert "rank: 1" in err or "rank 1" in err, err[-3000:]
    finally:
        if p.poll() is None:
            p.kill()


def test_hung_rank_times_out_naming_the_rank(setup):
    d, cfg = setup
    out = d / "H"
    port = free_port()
    procs = []
    for r in range(2):
        e = dict(env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "-c", str(cfg), f"train.out_dir={out}", "train.max_steps=100000",
             "distributed.timeout_s=8"], env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait_steps(out, procs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 1 hangs (alive, silent)
        t = time.time()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode != 0 and time.time() - t < 60
        assert "rank 0/2" in err and "timeout_s=8" in err, err[-3000:]
    finally:
        for p in procs:
            p.kill()
