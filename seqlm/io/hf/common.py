"""Shared pieces of the Hugging Face converters: reading a model directory (config.json,
safetensors or ``.bin`` weights read with ``weights_only=True``), refusing what seqlm cannot
represent (one error naming the config field), RoPE layout permutations, writing a directory
transformers loads."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from seqlm import fsutil
from seqlm.io.checkpoint import CheckpointError


class UnsupportedHF(CheckpointError):
    """A Hugging Face config uses something seqlm cannot represent exactly."""


def refuse(src, field: str, why: str):
    raise UnsupportedHF(f"{src}: config.json: {field}: {why}")


def read_config(path) -> dict[str, Any]:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{str(path)!r}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(p)!r}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CheckpointError(f"{str(p)!r}: no model_type (not a transformers config)")
    return cfg


def read_weights(path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory: *.safetensors (sharded or not), else *.bin loaded with
    ``weights_only=True`` (never unpickles code)."""
    from safetensors.torch import load_file

    d = Path(path)
    files = sorted(d.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(d.glob("pytorch_model*.bin")) or sorted(d.glob("*.bin"))
    if not bins:
        raise CheckpointError(f"{str(d)!r}: no *.safetensors or *.bin weights")
    for f in bins:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything but plain tensors is refused
            raise CheckpointError(f"{str(f)!r}: not a plain tensor file ({str(e)[:200]})") from None
        out.update(sd)
    return out


def take(sd: dict, key: str, src) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{src}: weights: missing tensor {key!r}")
    return sd.pop(key)


def rope_params(hc: dict, src) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` / ``rope_scaling`` / ``rotary_pct`` fields; scaled RoPE variants are refused."""
    rp = hc.get("rope_parameters") or {}
    scaling = hc.get("rope_scaling") or {}
    field = "rope_parameters" if rp else "rope_scaling"
    kind = rp.get("rope_type") or rp.get("type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        refuse(src, f"{field}.rope_type", f"{kind!r} is not supported (only unscaled RoPE)")
    theta = rp.get("rope_theta", hc.get("rope_theta", hc.get("rotary_emb_base", 10000.0)))
    frac = rp.get("partial_rotary_factor", hc.get("partial_rotary_factor", hc.get("rotary_pct", 1.0)))
    return float(theta), float(frac)


def half_to_pairs(hd: int, rot: int | None = None) -> torch.Tensor:
    """Index permutation of one head's channels: rotate-half RoPE layout (transformers: channel
    j pairs with j + rot/2) -> seqlm's interleaved pairs (2j, 2j+1). Applied to the rows of the
    q and k projections it gives the same attention scores (q.k is invariant under one
    permutation of both). Channels past ``rot`` (partial rotary) stay in place."""
    rot = hd if rot is None else rot
    h = rot // 2
    perm = [i for j in range(h) for i in (j, j + h)] + list(range(rot, hd))
    return torch.tensor(perm)


def permute_heads(w: torch.Tensor, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Rows of a (n_heads*hd, ...) projection (or bias): channel order within each head."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd, *w.shape[1:])[:, perm].reshape(w.shape)


def inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return inv


def act(src, field: str, name: str, allowed: dict[str, str]) -> str:
    if name not in allowed:
        refuse(src, field, f"activation {name!r} is not supported (supported: {sorted(allowed)})")
    return allowed[name]


def check_equal(src, field: str, value, expected, why: str = "") -> None:
    if value != expected:
        refuse(src, field, f"{value!r} is not supported{(' (' + why + ')') if why else ''}; seqlm needs {expected!r}")


def number(x):
    """A float from config.json: transformers 5 writes non-finite values as {"__float__": "Infinity"}."""
    if isinstance(x, dict) and "__float__" in x:
        return float(x["__float__"])
    return None if x is None else float(x)


def finite(x) -> float | None:
    x = number(x)
    return None if x is None or math.isinf(x) else x


def write_hf_dir(out, config: dict, tensors: dict[str, torch.Tensor], tokenizer_files: dict[str, bytes]) -> Path:
    """config.json + model.safetensors (+ tokenizer files), written to a temp dir and renamed."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
        if out.exists():
            if not (out / "config.json").exists() and any(out.iterdir()):
                raise FileExistsError(f"--out: {str(out)!r} exists and is not a model directory; not replacing it")
        fsutil.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- attention and MLP pieces shared by the families --------------------------------------
def attn_in(q, k, v, o, biases, H: int, Hkv: int, perm) -> dict[str, torch.Tensor]:
    """transformers' separate q/k/v/o (rotate-half RoPE when ``perm`` is given) -> seqlm's
    fused qkv_proj ([q heads | k heads | v heads]) and out_proj. ``biases``: (qb, kb, vb, ob) or None."""
    if perm is not None:
        q, k = permute_heads(q, H, perm), permute_heads(k, Hkv, perm)
    out = {"qkv_proj.weight": torch.cat([q, k, v]), "out_proj.weight": o}
    if biases is not None:
        qb, kb, vb, ob = biases
        if perm is not None:
            qb, kb = permute_heads(qb, H, perm), permute_heads(kb, Hkv, perm)
        out["qkv_proj.bias"], out["out_proj.bias"] = torch.cat([qb, kb, vb]), ob
    return out


def attn_out(sd: dict, H: int, Hkv: int, hd: int, perm):
    """Inverse of :func:`attn_in`: ((q, k, v, o), (qb, kb, vb, ob) or None)."""
    inv = None if perm is None else inverse(perm)
    sizes = [H * hd, Hkv * hd, Hkv * hd]
    q, k, v = sd["qkv_proj.weight"].split(sizes)
    if inv is not None:
        q, k = permute_heads(q, H, inv), permute_heads(k, Hkv, inv)
    ws = (q, k, v, sd["out_proj.weight"])
    if "qkv_proj.bias" not in sd:
        return ws, None
    qb, kb, vb = sd["qkv_proj.bias"].split(sizes)
    if inv is not None:
        qb, kb = permute_heads(qb, H, inv), permute_heads(kb, Hkv, inv)
    return ws, (qb, kb, vb, sd["out_proj.bias"])


def block_sd(sd: dict, i: int) -> dict[str, torch.Tensor]:
    """The tensors of seqlm layer i (stack.blocks.i.*), keys relative to the block."""
    pre = f"stack.blocks.{i}."
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}


def put_block(out: dict, i: int, tensors: dict) -> None:
    for k, v in tensors.items():
        out[f"stack.blocks.{i}.{k}"] = v


def put_norm(out: dict, i: int, w, b=None) -> None:
    out[f"stack.norms.{i}.weight"] = w
    if b is not None:
        out[f"stack.norms.{i}.bias"] = b


def uniform(mcfg, kind: str, what: str):
    """The one spec all layers of type ``kind`` share (exporters need a single per-type config)."""
    specs = [s for s in mcfg.layers if s.type == kind]
    for i, s in enumerate(mcfg.layers):
        if s.type == kind and s != specs[0]:
            raise UnsupportedHF(f"model.layers[{i}]: {what} needs every {kind} layer configured alike")
    return specs[0] if specs else None


def no_topology(mcfg, what: str) -> None:
    """Refuse stack topologies that transformers has no equivalent for."""
    if mcfg.recursive is not None:
        raise UnsupportedHF(f"model.recursive: {what} has no shared (recursive) layers; not exportable")
    if mcfg.residual != "standard":
        raise UnsupportedHF(f"model.residual: {mcfg.residual!r} has no {what} equivalent; not exportable")


def seqlm_out(sd: dict) -> tuple:
    """(embedding, final norm weight, final norm bias or None, head or None when tied)."""
    return sd["embed.weight"], sd["norm_f.weight"], sd.get("norm_f.bias"), sd.get("head.weight")
