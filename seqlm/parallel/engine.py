"""DeepSpeed glue: process groups, the generated DeepSpeed config, the engine.

The launcher is DeepSpeed's (``deepspeed --num_gpus N train.py ...``) or torchrun; both set
RANK / WORLD_SIZE / MASTER_ADDR. ``deepspeed.init_distributed`` picks the backend from
DeepSpeed's accelerator (gloo on CPU, NCCL on CUDA); the TP and DP groups are DeepSpeed's
device mesh (``deepspeed.utils.groups``), ranks [dp, tp] with TP innermost.
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
    return engine
