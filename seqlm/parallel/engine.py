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
