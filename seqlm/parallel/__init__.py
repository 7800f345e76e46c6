"""Scaling out: tensor parallelism from the blocks' plans (tp.py), the differentiable
collectives it needs (comm.py) and the DeepSpeed engine glue (engine.py)."""
from seqlm.parallel.tp import gather_state_dict, resolve_plan, shard_model

__all__ = ["gather_state_dict", "resolve_plan", "shard_model"]
