"""Mamba (MambaForCausalLM) and Mamba-2 (Mamba2ForCausalLM) <-> seqlm: RMSNorm pre-norm
around each mixer, no MLP layers (pattern ``M`` / ``2``). The Mamba-2 mixer weights are also
used by the hybrid (nemotron_h.py)."""
from __future__ import annotations

import math

from seqlm.io.hf.common import (UnsupportedHF, act, block_sd, check_equal, finite, no_topology, number, put_block, put_norm,
                                refuse, take, uniform)

MODEL_TYPES = ("mamba", "mamba2")


def _prefix(sd: dict) -> str:
    return "backbone." if any(k.startswith("backbone.") for k in sd) else "model."


def mamba2_in(sd: dict, p: str, src, bias: bool, conv_bias: bool) -> dict:
    """A Mamba-2 mixer's tensors under prefix ``p`` -> seqlm mamba2 block tensors."""
    out = {"in_proj.weight": take(sd, p + "in_proj.weight", src), "conv_weight": take(sd, p + "conv1d.weight", src)[:, 0],
           "A_log": take(sd, p + "A_log", src), "dt_bias": take(sd, p + "dt_bias", src), "D": take(sd, p + "D", src),
           "norm.weight": take(sd, p + "norm.weight", src), "out_proj.weight": take(sd, p + "out_proj.weight", src)}
    if conv_bias:
        out["conv_bias"] = take(sd, p + "conv1d.bias", src)
    if bias:
        out["in_proj.bias"], out["out_proj.bias"] = take(sd, p + "in_proj.bias", src), take(sd, p + "out_proj.bias", src)
    return out


def mamba2_out(b: dict, p: str) -> dict:
    out = {p + "in_proj.weight": b["in_proj.weight"], p + "conv1d.weight": b["conv_weight"][:, None],
           p + "A_log": b["A_log"], p + "dt_bias": b["dt_bias"], p + "D": b["D"], p + "norm.weight": b["norm.weight"],
           p + "out_proj.weight": b["out_proj.weight"]}
    for ours, theirs in (("conv_bias", "conv1d.bias"), ("in_proj.bias", "in_proj.bias"), ("out_proj.bias", "out_proj.bias")):
        if ours in b:
            out[p + theirs] = b[ours]
    return out


def to_seqlm(hc: dict, sd: dict, src):
    D, L = hc["hidden_size"], hc["num_hidden_layers"]
    act(src, "hidden_act", hc.get("hidden_act", "silu"), {"silu": "silu"})
    expand = hc.get("expand", 2)
    bias, conv_bias = bool(hc.get("use_bias", False)), bool(hc.get("use_conv_bias", True))
    if hc["model_type"] == "mamba":
        check_equal(src, "intermediate_size", hc.get("intermediate_size", expand * D), expand * D, "expand*hidden_size")
        r = hc.get("time_step_rank", "auto")
        spec = {"type": "mamba", "d_state": hc.get("state_size", 16), "d_conv": hc.get("conv_kernel", 4),
                "expand": expand, "dt_rank": math.ceil(D / 16) if r == "auto" else int(r),
                "bias": bias, "conv_bias": conv_bias}
    else:
        H, P = hc["num_heads"], hc["head_dim"]
        check_equal(src, "num_heads", H * P, expand * D, "num_heads*head_dim must equal expand*hidden_size")
        if not hc.get("rms_norm", True):
            refuse(src, "rms_norm", "false (no gated norm) is not supported")
        lo, hi = (list(hc.get("time_step_limit") or (0.0, math.inf)) + [math.inf])[:2]
        spec = {"type": "mamba2", "d_state": hc.get("state_size", 128), "d_conv": hc.get("conv_kernel", 4),
                "expand": expand, "head_dim": P, "ngroups": hc.get("n_groups", 1), "bias": bias,
                "conv_bias": conv_bias, "norm_eps": hc.get("layer_norm_epsilon", 1e-5), "dt_floor": number(lo),
                "dt_ceil": finite(hi), "chunk_size": int(hc.get("chunk_size", 256))}
    tied = bool(hc.get("tie_word_embeddings", hc["model_type"] == "mamba"))
    mcfg = {"vocab_size": hc["vocab_size"], "d_model": D, "layers": [spec] * L, "norm": "rmsnorm",
            "norm_eps": hc.get("layer_norm_epsilon", 1e-5), "tie_embeddings": tied}
    pre = _prefix(sd)
    out = {"embed.weight": take(sd, pre + "embeddings.weight", src)}
    for i in range(L):
        p = f"{pre}layers.{i}."
        put_norm(out, i, take(sd, p + "norm.weight", src))
        m = p + "mixer."
        if spec["type"] == "mamba2":
            put_block(out, i, mamba2_in(sd, m, src, bias, conv_bias))
            continue
        b = {"in_proj.weight": take(sd, m + "in_proj.weight", src), "conv_weight": take(sd, m + "conv1d.weight", src)[:, 0],
             "x_proj.weight": take(sd, m + "x_proj.weight", src), "dt_proj.weight": take(sd, m + "dt_proj.weight", src),
             "dt_proj.bias": take(sd, m + "dt_proj.bias", src), "A_log": take(sd, m + "A_log", src),
             "D": take(sd, m + "D", src), "out_proj.weight": take(sd, m + "out_proj.weight", src)}
        if conv_bias:
            b["conv_bias"] = take(sd, m + "conv1d.bias", src)
        if bias:
            b["in_proj.bias"], b["out_proj.bias"] = take(sd, m + "in_proj.bias", src), take(sd, m + "out_proj.bias", src)
        put_block(out, i, b)
    out["norm_f.weight"] = take(sd, pre + "norm_f.weight", src)
    out["head.weight"] = out["embed.weight"] if tied else take(sd, "lm_head.weight", src)
    sd.pop("lm_head.weight", None)
    return mcfg, out


def from_seqlm(mcfg, sd: dict, V: int, eos_id: int):
    no_topology(mcfg, "Mamba")
    kind = mcfg.layers[0].type
    spec = uniform(mcfg, kind, f"{kind} export")
    if mcfg.norm != "rmsnorm" or mcfg.pos_embedding != "none" or mcfg.parallel_residual:
        raise UnsupportedHF("model.norm: Mamba models use rmsnorm, no positions, sequential residual")
    D, L = mcfg.d_model, len(mcfg.layers)
    hc = {"vocab_size": V, "hidden_size": D, "num_hidden_layers": L, "state_size": spec.d_state,
          "conv_kernel": spec.d_conv, "expand": spec.expand, "use_bias": spec.bias, "use_conv_bias": spec.conv_bias,
          "hidden_act": "silu", "layer_norm_epsilon": mcfg.norm_eps, "tie_word_embeddings": mcfg.tie_embeddings,
          "eos_token_id": eos_id, "bos_token_id": eos_id, "pad_token_id": eos_id, "residual_in_fp32": True,
          "torch_dtype": "float32"}
    if kind == "mamba":
        hc.update(architectures=["MambaForCausalLM"], model_type="mamba", intermediate_size=spec.expand * D,
                  time_step_rank=spec.rank(D))
    else:
        if spec.norm_eps != mcfg.norm_eps:
            raise UnsupportedHF(f"model.layers[0].norm_eps: Mamba2 uses one epsilon ({mcfg.norm_eps}) for all norms")
        hc.update(architectures=["Mamba2ForCausalLM"], model_type="mamba2", num_heads=spec.expand * D // spec.head_dim,
                  head_dim=spec.head_dim, n_groups=spec.ngroups, chunk_size=spec.chunk_size, rms_norm=True,
                  time_step_limit=[spec.dt_floor, spec.dt_ceil if spec.dt_ceil is not None else {"__float__": "Infinity"}])
    out = {"backbone.embeddings.weight": sd["embed.weight"], "backbone.norm_f.weight": sd["norm_f.weight"]}
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(L):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = sd[f"stack.norms.{i}.weight"]
        b = block_sd(sd, i)
        if kind == "mamba2":
            out.update(mamba2_out(b, p + "mixer."))
            continue
        m = p + "mixer."
        out.update({m + "in_proj.weight": b["in_proj.weight"], m + "conv1d.weight": b["conv_weight"][:, None],
                    m + "x_proj.weight": b["x_proj.weight"], m + "dt_proj.weight": b["dt_proj.weight"],
                    m + "dt_proj.bias": b["dt_proj.bias"], m + "A_log": b["A_log"], m + "D": b["D"],
                    m + "out_proj.weight": b["out_proj.weight"]})
        for ours, theirs in (("conv_bias", "conv1d.bias"), ("in_proj.bias", "in_proj.bias"), ("out_proj.bias", "out_proj.bias")):
            if ours in b:
                out[m + theirs] = b[ours]
    return hc, out
