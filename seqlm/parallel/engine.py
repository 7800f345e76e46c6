"""DeepSpeed glue: process groups, the generated DeepSpeed config, the engine.

The launcher is DeepSpeed's (``deepspeed --num_gpus N train.py ...``) or torchrun; both set
RANK / WORLD_SIZE / MASTER_ADDR. ``deepspeed.init_distributed`` picks the backend from
DeepSpeed's accelerator (gloo on CPU, NCCL on CUDA); the TP and DP groups are DeepSpeed's
device mesh (``deepspeed.utils.groups``), ranks [dp, tp] with TP innermost.

DeepSpeed's checkpoint is ``torch.save`` pickles, and DeepSpeed reads it back with an
unrestricted unpickler. seqlm never does: the engine's checkpoint reader is replaced by
:func:`safe_load` (torch's restricted ``weights_only`` unpickler with a four-class
allowlist), and :func:`load_ds_checkpoint` checks every file of the tag first.
"""
from __future__ import annotations

import datetime
import os


def launched() -> bool:
    """True under a distributed launcher (deepspeed, torchrun, mpirun): WORLD_SIZE is set."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def init_distributed(timeout_s: float = 300.0) -> None:
    """Join the process group (idempotent); one thread per rank's share of the cores."""
    import deepspeed
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def init_groups(tp_size: int):
    """(tp_group, dp_group) of DeepSpeed's device mesh for ``tp_size``."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"distributed.tp_size: {tp_size} does not divide the world size {world}")
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups.get_tensor_model_parallel_group(), groups.get_data_parallel_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def device():
    """The device DeepSpeed's accelerator gives this rank (cpu, or cuda:LOCAL_RANK)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(acc.device_name(), int(os.environ.get("LOCAL_RANK", "0")))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg, dp_size: int, dev, bf16: bool) -> dict:
    """The DeepSpeed config of a RunConfig: micro-batch, accumulation, global batch =
    micro x accum x DP; ZeRO stage; DeepSpeed's AdamW (torch's on CPU, FusedAdam on GPU)
    with train.* hyper-parameters (the LR is set per step from seqlm's schedule); clipping.
    ``distributed.deepspeed_config`` (a JSON file) overrides any key."""
    import json

    from seqlm.config import ConfigError

    tc, dc = cfg.train, cfg.distributed
    conf = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * dp_size,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": dc.zero_stage, "overlap_comm": dc.overlap_comm},
        "optimizer": {"type": "AdamW", "params": {
            "lr": tc.lr, "betas": [tc.beta1, tc.beta2], "eps": 1e-8, "weight_decay": tc.weight_decay,
            **({"torch_adam": True} if dev.type == "cpu" else {})}},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if dc.deepspeed_config:
        try:
            with open(dc.deepspeed_config) as f:
                user = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"distributed.deepspeed_config: cannot read {dc.deepspeed_config!r}: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"distributed.deepspeed_config: {dc.deepspeed_config!r} is not a JSON object")
        conf = _merge(conf, user)
    return conf


def build_engine(model, param_groups, conf: dict):
    """``deepspeed.initialize`` over a (sharded) model whose forward is ``model.loss(x, y)``,
    with DeepSpeed's TP/DP groups as its mpu (ZeRO shards over the DP group only)."""
    import deepspeed
    from deepspeed.utils import groups
    from torch import nn

    class LossModule(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, x, y, seq_idx=None):
            return self.model.loss(x, y) if seq_idx is None else self.model.loss(x, y, seq_idx=seq_idx)

    engine, _, _, _ = deepspeed.initialize(model=LossModule(model), model_parameters=param_groups,
                                           config=conf, mpu=groups)
    engine.checkpoint_engine.load = safe_load  # every file DeepSpeed reads back (model, optimizer, ZeRO)
    return engine


# -- DeepSpeed's checkpoint, read back without running code ---------------------------------
def ds_safe_globals() -> list:
    """The only classes (besides tensors, containers, numbers and strings) in DeepSpeed's
    ZeRO 0/1/2 checkpoints, found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
    on real runs: plain records rebuilt from their fields (a slice's numel/start, a loss
    scale, the ZeRO stage number). Constructing them runs no code from the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def _why(e: Exception) -> str:
    """One line out of torch's (multi-line) refusal."""
    import re

    msg = str(e)
    g = re.search(r"GLOBAL ([\w.]+)", msg)
    if g:
        return f"it names {g.group(1)}, which is not allowed"
    tail = msg.split("WeightsUnpickler error:", 1)[-1] if "Weights only" in msg else msg
    lines = [l.strip() for l in tail.splitlines() if l.strip() and not l.strip().startswith("Check the doc")]
    return (lines or [type(e).__name__])[0][:200]


def safe_load(path, map_location=None):
    """``torch.load`` of one DeepSpeed checkpoint file through the restricted unpickler
    (``weights_only``, plus :func:`ds_safe_globals`); anything else, or an unreadable file,
    is one CheckpointError naming the file."""
    import torch
    from torch.serialization import safe_globals

    from seqlm.io.checkpoint import CheckpointError

    try:
        with safe_globals(ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a refused global, a truncated or foreign file
        raise CheckpointError(f"DeepSpeed checkpoint {str(path)!r}: not loaded ({_why(e)}); only tensors and "
                              f"DeepSpeed's plain state records are read, nothing in a checkpoint may run code") from None


def check_ds_checkpoint(tag_dir) -> None:
    """Every ``*.pt`` of a DeepSpeed checkpoint tag may name only allowlisted globals. The
    pickles are disassembled, not run, and every rank checks every file, so a planted file
    stops all ranks with the same CheckpointError (not one rank, leaving the others
    waiting in a collective). :func:`safe_load` still guards the actual reads."""
    from pathlib import Path

    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    from seqlm.io.checkpoint import CheckpointError

    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            with safe_globals(ds_safe_globals()):
                bad = get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # noqa: BLE001 - not a torch zip file, a truncated one
            raise CheckpointError(f"DeepSpeed checkpoint {str(f)!r}: unreadable ({_why(e)})") from None
        if bad:
            raise CheckpointError(f"DeepSpeed checkpoint {str(f)!r}: refused, it names {sorted(bad)} (only tensors "
                                  f"and DeepSpeed's plain state records are read, nothing in a checkpoint may run code)")


def load_ds_checkpoint(engine, ds_dir, tag: str) -> dict:
    """Restore the engine (weights, optimizer, ZeRO partitions) from ``ds_dir/tag`` and
    return the client state, with every file read by :func:`safe_load`."""
    from seqlm.io.checkpoint import CheckpointError

    if engine.load_universal_checkpoint():  # DeepSpeed reads universal checkpoints with its own unpickler
        raise CheckpointError("distributed.deepspeed_config: checkpoint.load_universal is not supported "
                              "(DeepSpeed unpickles those files without restriction)")
    check_ds_checkpoint(os.path.join(ds_dir, tag))
    path, client = engine.load_checkpoint(str(ds_dir), tag=tag)
    if path is None or client is None:
        raise CheckpointError(f"--resume: DeepSpeed found no checkpoint {tag!r} in {str(ds_dir)!r}")
    return client
