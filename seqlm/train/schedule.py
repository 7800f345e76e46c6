"""Learning-rate schedules as pure functions of the step (so resuming needs no state)."""
from __future__ import annotations

import math


def lr_at(step: int, cfg) -> float:
    """LR for optimizer step ``step`` (0-based) under a TrainConfig."""
    peak, floor, total = cfg.lr, cfg.min_lr, cfg.max_steps
    warm = min(cfg.warmup_steps, total)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total - warm)
        frac = min(1.0, (step - warm) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))
    if cfg.schedule == "wsd":
        decay = max(1, int(round(cfg.decay_fraction * total)))
        start = max(warm, total - decay)
        if step < start:
            return peak
        frac = min(1.0, (step - start) / max(1, total - start))
        return peak + (floor - peak) * frac
    raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r}")
