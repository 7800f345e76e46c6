"""AdamW with decoupled weight decay on matrices only (not norms, biases, SSM parameters).

What never decays is declared, not guessed from names: every module may list parameter
paths (relative to itself) in a ``no_weight_decay`` attribute. Blocks declare their SSM
parameters there (``Block.no_weight_decay``); wrappers that re-home a block's parameters
(relaxed recursive's per-depth copies) declare the copies. Parameters with fewer than two
dimensions (norm weights, biases) never decay.
"""
from __future__ import annotations

import torch


def no_decay_ids(model: torch.nn.Module) -> set[int]:
    """ids of the parameters some module declares in its ``no_weight_decay``."""
    out = set()
    for mod in model.modules():
        for name in getattr(mod, "no_weight_decay", ()) or ():
            try:
                p = mod.get_parameter(name)
            except AttributeError:  # slot emptied (a shared block whose copies live elsewhere)
                continue
            if p is not None:
                out.add(id(p))
    return out


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay, seen = [], [], set()
    exempt = no_decay_ids(model)
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in exempt else no_decay).append(p)
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
