"""AdamW with decoupled weight decay on matrices only (not norms, biases, SSM scalars)."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # 2-D weights of Linear/Embedding decay; vectors, A_log, D, dt biases, norms do not
        is_matrix = p.dim() >= 2 and not name.split(".")[-1].startswith(("A_log", "dt_bias", "D"))
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW for a TrainConfig (fused kernel where torch supports it for the device)."""
    groups = param_groups(model, cfg.weight_decay)
    dev = next(model.parameters()).device
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw) if dev.type in ("cuda", "cpu") else torch.optim.AdamW(groups, **kw)
    except (RuntimeError, TypeError):  # fused unsupported for this device/dtype
        return torch.optim.AdamW(groups, **kw)
