"""MQAR evaluation: accuracy, per-label predictions and checkpoint evaluation. The data
generator (MQARSpec, make_mqar, ...) lives in seqlm/data/mqar.py and is re-exported here."""
from __future__ import annotations

from typing import Optional

import torch

from seqlm.data.mqar import (IGNORE, STANDARD_SETTINGS, STANDARD_VOCAB, MQARSpec, gap_probs,  # noqa: F401
                             make_mqar, make_mqar_ref)


def mqar_accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled positions (labels != -100) where argmax == label."""
    preds = logits_or_preds.argmax(-1) if logits_or_preds.dim() == labels.dim() + 1 else logits_or_preds
    mask = labels != IGNORE
    n = int(mask.sum())
    if n == 0:
        raise ValueError("labels: no labelled positions")
    return float((preds[mask] == labels[mask]).sum()) / n


@torch.no_grad()
def label_predictions(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """Argmax predictions of ``model`` (an seqlm LM) at the labelled positions, as a (n_labels,)
    tensor in row-major order of ``labels != -100``. Only those positions go through the head."""
    device = device or next(model.parameters()).device
    out = []
    for s in range(0, inputs.shape[0], batch_size):
        x = inputs[s:s + batch_size].to(device)
        m = (labels[s:s + batch_size] != IGNORE).to(device)
        out.append(select_logits(model, x, m).argmax(-1).cpu())
    return torch.cat(out)


def select_logits(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (n, V) only at ``mask`` positions: the head is applied to those hidden states only
    (MQAR labels 4-64 of 64-512 positions; skipping the rest makes training on a V=8192 vocab cheap)."""
    if hasattr(model, "hidden") and hasattr(model, "head"):
        h, _ = model.hidden(x)
        return model.head(h[mask])
    logits, _ = model(x)  # any other LM (e.g. HMT wrapper)
    return logits[mask]


@torch.no_grad()
def evaluate_mqar(model, spec: MQARSpec, num_examples: int = 1000, seed: int = 1234,
                  batch_size: int = 256) -> dict:
    """Accuracy of ``model`` on freshly generated MQAR examples (seed distinct from training)."""
    was = model.training
    model.eval()
    x, y = make_mqar(num_examples, spec, seed)
    preds = label_predictions(model, x, y, batch_size)
    model.train(was)
    target = y[y != IGNORE]
    return {"accuracy": float((preds == target).float().mean()), "n_queries": int(target.numel()),
            "num_examples": num_examples, "spec": spec.to_dict(), "seed": seed}
