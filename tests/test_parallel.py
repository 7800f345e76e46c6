"""Tensor parallelism (seqlm/parallel) with real 2-rank runs over gloo: TP=2 logits and
gathered gradients equal TP=1 for every registered block and for hybrid, ladder,
recursive and HMT stacks (one 2-process run, tests/dist/tp_cases.py, checked per case)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from seqlm import registry

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where gloo's own connections and
    other jobs' sockets land, so a rendezvous port is not taken between pick and use."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def run_ranks(script, args, world=2, timeout=240, extra_env=None):
    """Start ``world`` ranks of ``script`` with the env a launcher sets; (rc, logs)."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs, rcs = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
        rcs.append(p.returncode)
    return rcs, logs


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "res.json"
    rcs, logs = run_ranks(ROOT / "tests" / "dist" / "tp_cases.py", [out])
    assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
    return json.loads(out.read_text())


CASES = [f"block:{n}" for n in registry.blocks()] + [
    "mamba2:ngroups2+bias", "mamba:bias+gelu-mlp-bias", "gpt2-style:learned-pos+layernorm+biases",
    "neox-style:parallel-residual+partial-rotary", "hybrid", "hybrid+ladder", "hybrid+recursive", "hybrid+hmt",
    "hybrid+ladder+overlap", "hybrid+ladder+recursive+overlap"]


@pytest.mark.parametrize("case", CASES)
def test_tp2_equals_tp1(tp_results, case):
    r = tp_results[case]
    assert r["sharded"] > 0, "nothing was sharded"
    assert r["logits"] <= 1e-5, r
    assert r["grads"] <= 1e-5, r  # gathered gradients, relative to each parameter's largest


def test_ladder_overlap_issues_async_all_reduces(tp_results):
    """With ladder_overlap every block's out_proj all-reduce (2 passes: forward of the model
    and of the loss) went async, and the results above still equal TP=1."""
    assert tp_results["hybrid+ladder+overlap"]["async"] == 2 * 8
    assert tp_results["hybrid+ladder+recursive+overlap"]["async"] == 2 * 8
    assert tp_results["hybrid+ladder"]["async"] == 0


# -- layouts and the generated DeepSpeed config (single process) ------------------------------
def test_impossible_layouts_fail_at_load_naming_the_field():
    from seqlm.config import ConfigError, parse_config

    bad = [({"pattern": "*", "block_defaults": {"attention": {"n_heads": 6}}, "d_model": 48}, 4,
            "model.layers[0].n_heads"),
           ({"pattern": "-*", "block_defaults": {"attention": {"n_heads": 4, "n_kv_heads": 1}}}, 2,
            "model.layers[1].n_kv_heads"),
           ({"pattern": "2", "d_model": 32, "block_defaults": {"mamba2": {"head_dim": 8, "ngroups": 2}}}, 4,
            "model.layers[0].ngroups"),
           ({"pattern": "2", "d_model": 32, "block_defaults": {"mamba2": {"head_dim": 16}}}, 8,
            "model.layers[0].head_dim"),
           ({"pattern": "-H", "d_model": 24, "block_defaults": {"h3": {"head_dim": 4}}}, 4, "model.layers[1].head_dim"),
           ({"pattern": "M", "d_model": 25}, 4, "model.layers[0].expand"),
           ({"pattern": "-", "d_model": 32, "block_defaults": {"mlp": {"hidden": 90}}}, 4, "model.layers[0].hidden"),
           ({"pattern": "-", "d_model": 25, "block_defaults": {"mlp": {"kind": "relu2"}}}, 8,  # 4*d_model = 100
            "model.layers[0].hidden")]
    for model, tp, field in bad:
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_config({"model": model, "distributed": {"tp_size": tp}})


def test_gpu_preset_splits_at_tp_2_4_8():
    from seqlm.config import load_config

    for tp in (2, 4, 8):
        assert load_config(ROOT / "configs" / "hybrid_long_gpu.yaml", [f"distributed.tp_size={tp}"])


def test_tp_without_launcher_is_refused(tmp_path):
    from seqlm.config import ConfigError, parse_config
    from seqlm.train.loop import train

    cfg = parse_config({"distributed": {"tp_size": 2}, "train": {"out_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="distributed.tp_size: 2 needs"):
        train(cfg)


def test_generated_deepspeed_config_and_user_override(tmp_path):
    import torch

    from seqlm.config import ConfigError, parse_config
    from seqlm.parallel.engine import ds_config

    cfg = parse_config({"train": {"batch_size": 3, "grad_accum": 2, "grad_clip": 0.5, "lr": 1e-3},
                        "distributed": {"zero_stage": 2}})
    c = ds_config(cfg, 4, torch.device("cpu"), False)
    assert c["train_batch_size"] == 24 and c["gradient_accumulation_steps"] == 2
    assert c["zero_optimization"]["stage"] == 2 and c["gradient_clipping"] == 0.5
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["torch_adam"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}))
    cfg = parse_config({"distributed": {"zero_stage": 1, "deepspeed_config": str(user)}})
    c = ds_config(cfg, 1, torch.device("cpu"), False)
    assert c["zero_optimization"] == {"stage": 1, "overlap_comm": False, "reduce_bucket_size": 1000}
    assert c["gradient_clipping"] == 2.0
    user.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="distributed.deepspeed_config"):
        ds_config(cfg, 1, torch.device("cpu"), False)


def test_universal_checkpoint_resume_is_refused():
    """DeepSpeed reads universal checkpoints with its own unrestricted unpickler: refused."""
    from seqlm.io.checkpoint import CheckpointError
    from seqlm.parallel.engine import load_ds_checkpoint

    class Engine:  # only what load_ds_checkpoint asks before touching any file
        def load_universal_checkpoint(self):
            return True

        def load_checkpoint(self, *a, **k):
            raise AssertionError("must not be reached")

    with pytest.raises(CheckpointError, match="checkpoint.load_universal"):
        load_ds_checkpoint(Engine(), "/nonexistent", "step1")
