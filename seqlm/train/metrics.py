"""Run logging: JSONL metrics, TensorBoard events and a loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def _step(line: str) -> float:
    try:
        rec = json.loads(line)
        return rec.get("step", 0) if isinstance(rec, dict) else float("inf")
    except ValueError:
        return float("inf")


class MetricsLog:
    """Appends one JSON object per record to ``<out_dir>/metrics.jsonl`` and mirrors scalars
    to TensorBoard (``<out_dir>/tb``)."""

    def __init__(self, out_dir, tensorboard: bool = True, truncate_after: Optional[int] = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if truncate_after is not None and self.path.exists():
            # resuming: drop records past the checkpoint's step so the log reads as one run
            # (a line torn by a crash mid-write is dropped; the file is replaced atomically)
            keep = [ln for ln in self.path.read_text(errors="replace").splitlines() if _step(ln) <= truncate_after]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        elif truncate_after is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional at run time
                self._tb = None

    def log(self, kind: str, step: int, **values) -> None:
        rec = {"kind": kind, "step": step, **values}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def plot_losses(metrics_path, png_path, title: str = "") -> Optional[Path]:
    """Train and validation loss vs step from a metrics.jsonl; returns the PNG path."""
    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train" and "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "eval" and "val_loss" in r]
    if not tr and not va:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
