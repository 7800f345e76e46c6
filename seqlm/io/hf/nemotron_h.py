"""Nemotron-H (NemotronHForCausalLM) <-> seqlm: a hybrid of Mamba-2, attention and MLP layers,
one sub-layer per layer with an RMSNorm pre-norm, exactly seqlm's layer model. Its layer
pattern (``M`` Mamba-2, ``*`` attention, ``-`` MLP) maps onto seqlm's pattern string with
``M`` -> ``2``. Attention has no positional encoding (rope: false); the MLP is squared ReLU
(kind relu2). MoE layers (``E``) are refused. Multi-token-prediction heads, if any, are not
part of next-token inference and are not imported.

transformers applies ``dt >= time_step_min`` in the chunked (prefill) path but not in its
one-token decode path; seqlm clamps in both (``dt_floor``), so decode can differ from
transformers' own decode where a head's dt falls below time_step_min."""
from __future__ import annotations

from seqlm.io.hf.common import (UnsupportedHF, act, attn_in, attn_out, block_sd, check_equal, no_topology, put_block,
                                put_norm, refuse, take, uniform)
from seqlm.io.hf.mamba import _prefix, mamba2_in, mamba2_out

MODEL_TYPES = ("nemotron_h",)
_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_NAMES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention", "full_attention": "attention",
          "mlp": "mlp", "moe": "moe"}


def layer_types(hc: dict, src) -> list[str]:
    lt = hc.get("layers_block_type") or hc.get("layer_types")
    if lt is None and hc.get("hybrid_override_pattern"):
        lt = [_CHARS.get(c, c) for c in hc["hybrid_override_pattern"]]
    if not lt:
        refuse(src, "layers_block_type", "missing")
    out = []
    for i, t in enumerate(lt):
        n = _NAMES.get(t)
        if n is None or n == "moe":
            refuse(src, f"layers_block_type[{i}]", f"{t!r} is not supported (mamba, attention and mlp layers only)")
        out.append(n)
    return out


def to_seqlm(hc: dict, sd: dict, src):
    D = hc["hidden_size"]
    kinds = layer_types(hc, src)
    H, Hkv = hc["num_attention_heads"], hc.get("num_key_value_heads") or hc["num_attention_heads"]
    hd = hc.get("head_dim") or D // H
    expand = hc.get("expand", hc.get("mamba_expand", 2))
    mh, mp = hc.get("mamba_num_heads", 128), hc.get("mamba_head_dim", 64)
    check_equal(src, "mamba_num_heads", mh * mp, expand * D, "mamba_num_heads*mamba_head_dim must equal expand*hidden_size")
    act(src, "mamba_hidden_act", hc.get("mamba_hidden_act", "silu"), {"silu": "silu"})
    kind = act(src, "mlp_hidden_act", hc.get("mlp_hidden_act", "relu2"), {"relu2": "relu2", "gelu": "gelu"})
    eps = hc.get("layer_norm_epsilon", 1e-5)
    bias, conv_bias = bool(hc.get("use_bias", False)), bool(hc.get("use_conv_bias", True))
    m2 = {"type": "mamba2", "d_state": hc.get("ssm_state_size", 128), "d_conv": hc.get("conv_kernel", 4),
          "expand": expand, "head_dim": mp, "ngroups": hc.get("n_groups", 8), "bias": bias, "conv_bias": conv_bias,
          "norm_eps": eps, "dt_floor": float(hc.get("time_step_min", 1e-3)),
          "chunk_size": int(hc.get("chunk_size", 128))}
    at = {"type": "attention", "n_heads": H, "n_kv_heads": Hkv, "head_dim": hd, "rope": False,
          "window": hc.get("sliding_window")}
    ml = {"type": "mlp", "kind": kind, "hidden": hc["intermediate_size"], "bias": bool(hc.get("mlp_bias", False))}
    spec = {"mamba": m2, "attention": at, "mlp": ml}
    tied = bool(hc.get("tie_word_embeddings", False))
    mcfg = {"vocab_size": hc["vocab_size"], "d_model": D, "layers": [spec[k] for k in kinds], "norm": "rmsnorm",
            "norm_eps": eps, "tie_embeddings": tied}
    pre = _prefix(sd)
    out = {"embed.weight": take(sd, pre + "embeddings.weight", src)}
    for i, k in enumerate(kinds):
        p = f"{pre}layers.{i}."
        put_norm(out, i, take(sd, p + "norm.weight", src))
        m = p + "mixer."
        if k == "mamba":
            put_block(out, i, mamba2_in(sd, m, src, bias, conv_bias))
        elif k == "attention":
            put_block(out, i, attn_in(*[take(sd, m + f"{n}_proj.weight", src) for n in "qkvo"], None, H, Hkv, None))
        else:
            b = {"up_proj.weight": take(sd, m + "up_proj.weight", src), "out_proj.weight": take(sd, m + "down_proj.weight", src)}
            if ml["bias"]:
                b["up_proj.bias"], b["out_proj.bias"] = take(sd, m + "up_proj.bias", src), take(sd, m + "down_proj.bias", src)
            put_block(out, i, b)
    out["norm_f.weight"] = take(sd, pre + "norm_f.weight", src)
    out["head.weight"] = out["embed.weight"] if tied else take(sd, "lm_head.weight", src)
    sd.pop("lm_head.weight", None)
    for k in [k for k in sd if k.startswith(("mtp.", pre + "mtp."))]:
        sd.pop(k)
    return mcfg, out


def from_seqlm(mcfg, sd: dict, V: int, eos_id: int):
    no_topology(mcfg, "Nemotron-H")
    m2, at, ml = (uniform(mcfg, t, "Nemotron-H export") for t in ("mamba2", "attention", "mlp"))
    problems = []
    if mcfg.norm != "rmsnorm" or mcfg.pos_embedding != "none" or mcfg.parallel_residual:
        problems.append("model.norm: Nemotron-H uses rmsnorm, no positions, sequential residual")
    if at is not None and (at.rope or at.bias):
        problems.append("model.layers[*].rope: Nemotron-H attention has no RoPE and no bias (needs rope: false, "
                        "bias: false)")
    if ml is not None and ml.kind not in ("relu2", "gelu"):
        problems.append(f"model.layers[*].kind: Nemotron-H MLPs are two-matrix (relu2), got {ml.kind!r}")
    if m2.dt_ceil is not None:
        problems.append("model.layers[*].dt_ceil: Nemotron-H has no upper dt clamp")
    if m2.norm_eps != mcfg.norm_eps:
        problems.append(f"model.layers[*].norm_eps: Nemotron-H uses one epsilon ({mcfg.norm_eps}) for all norms")
    if problems:
        raise UnsupportedHF("; ".join(problems))
    D = mcfg.d_model
    names = {"mamba2": "M", "attention": "*", "mlp": "-"}
    hc = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": V, "hidden_size": D,
          "hybrid_override_pattern": "".join(names[s.type] for s in mcfg.layers), "layer_norm_epsilon": mcfg.norm_eps,
          "tie_word_embeddings": mcfg.tie_embeddings, "eos_token_id": eos_id, "bos_token_id": eos_id,
          "pad_token_id": eos_id, "ssm_state_size": m2.d_state, "conv_kernel": m2.d_conv, "expand": m2.expand,
          "mamba_num_heads": m2.expand * D // m2.head_dim, "mamba_head_dim": m2.head_dim, "n_groups": m2.ngroups,
          "use_bias": m2.bias, "use_conv_bias": m2.conv_bias, "mamba_hidden_act": "silu", "time_step_min": m2.dt_floor,
          "chunk_size": m2.chunk_size, "residual_in_fp32": False, "num_nextn_predict_layers": 0,
          "torch_dtype": "float32"}
    if at is not None:
        hc.update(num_attention_heads=at.n_heads, num_key_value_heads=at.n_kv_heads or at.n_heads,
                  head_dim=at.head_dim or D // at.n_heads, sliding_window=at.window, attention_bias=False)
    if ml is not None:
        i = next(j for j, s in enumerate(mcfg.layers) if s.type == "mlp")
        hc.update(intermediate_size=sd[f"stack.blocks.{i}.up_proj.weight"].shape[0], mlp_hidden_act=ml.kind,
                  mlp_bias=ml.bias)
    # lm_head.weight is written even when tied: NemotronHForCausalLM (transformers 5.24) does not tie
    # it to the embeddings and would initialise it randomly
    out = {"backbone.embeddings.weight": sd["embed.weight"], "backbone.norm_f.weight": sd["norm_f.weight"],
           "lm_head.weight": sd["head.weight"].clone() if mcfg.tie_embeddings else sd["head.weight"]}
    for i, s in enumerate(mcfg.layers):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = sd[f"stack.norms.{i}.weight"]
        b, m = block_sd(sd, i), p + "mixer."
        if s.type == "mamba2":
            out.update(mamba2_out(b, m))
        elif s.type == "attention":
            H, Hkv = at.n_heads, at.n_kv_heads or at.n_heads
            (q, k, v, o), _ = attn_out(b, H, Hkv, at.head_dim or D // H, None)
            out.update({m + "q_proj.weight": q, m + "k_proj.weight": k, m + "v_proj.weight": v, m + "o_proj.weight": o})
        else:
            out.update({m + "up_proj.weight": b["up_proj.weight"], m + "down_proj.weight": b["out_proj.weight"]})
            if "up_proj.bias" in b:
                out.update({m + "up_proj.bias": b["up_proj.bias"], m + "down_proj.bias": b["out_proj.bias"]})
    return hc, out
