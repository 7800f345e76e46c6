"""The self-contained model directory behind ``LM.save_pretrained`` / ``LM.from_pretrained``.

    <dir>/config.yaml        a RunConfig (its ``model`` section describes the network)
    <dir>/model.safetensors  weights (tied tensors stored once)
    <dir>/tokenizer/         the tokenizer, when one was given
    <dir>/meta.json          vocab size, parameter count, seqlm version, metrics
    <dir>/README.md          a model card: the config and the metrics

This is the layout of a model-only seqlm checkpoint, so ``--checkpoint`` options and
``seqlm.load`` read it too. It sits beside model.py and uses only the config and
safetensors: the model never imports the checkpoint machinery of seqlm/io."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from seqlm import fsutil
from seqlm.config import ConfigError, RunConfig, dump_config, load_config


def model_card(cfg_yaml: str, n_params: int, metrics: Optional[dict], tokenizer) -> str:
    import seqlm

    lines = ["---", "library_name: seqlm", "tags: [seqlm, long-context]", "---", "", "# seqlm model", "",
             f"{n_params:,} parameters, saved by seqlm {seqlm.__version__}. Load it with:", "", "```python",
             "import seqlm", "model, tokenizer = seqlm.load(\"<this directory>\")", "```", ""]
    if tokenizer is not None:
        lines += [f"Tokenizer: `{tokenizer.type}`, {tokenizer.vocab_size} ids, EOS {tokenizer.eos_id}.", ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("none recorded")
    lines += ["", "## Config", "", "```yaml", cfg_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def save_pretrained_dir(model, directory, tokenizer=None, run_config=None, metrics=None) -> Path:
    import seqlm

    model = getattr(model, "_orig_mod", model)
    cfg = run_config if run_config is not None else RunConfig(model=model.cfg)
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        text = dump_config(cfg)
        (tmp / "config.yaml").write_text(text)
        _st_save_model(model, str(tmp / "model.safetensors"))
        n = sum(p.numel() for p in model.parameters())
        meta = {"seqlm_version": seqlm.__version__, "vocab_size": model.vocab_size, "n_params": n,
                "metrics": metrics or {}}
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
            meta["tokenizer_fingerprint"] = tokenizer.fingerprint()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(model_card(text, n, metrics, tokenizer))
        if out.exists():
            if not (out / "config.yaml").exists() and any(out.iterdir()):
                raise FileExistsError(f"{str(out)!r} exists and is not a seqlm model directory; not replacing it")
        fsutil.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_pretrained_dir(cls, directory, device="cpu", dtype=None):
    d = Path(directory)
    for f in ("config.yaml", "model.safetensors"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{str(d)!r}: no {f} (not a seqlm model directory)")
    try:
        cfg = load_config(d / "config.yaml")
    except ConfigError as e:
        raise ValueError(f"{str(d)!r}: {e}") from None
    if cfg.memory is not None:
        raise ValueError(f"{str(d)!r}: an HMT model; load it with seqlm.load")
    vocab = None
    if (d / "meta.json").is_file():
        vocab = json.loads((d / "meta.json").read_text()).get("vocab_size")
    if vocab is None and cfg.model.vocab_size is None:
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            vocab = f.get_slice("embed.weight").get_shape()[0]
    model = cls(cfg.model, vocab)
    try:
        _st_load_model(model, str(d / "model.safetensors"))
    except RuntimeError as e:
        raise ValueError(f"{str(d)!r}: weights do not fit the config: {e}") from None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


__all__ = ["save_pretrained_dir", "load_pretrained_dir", "model_card"]
