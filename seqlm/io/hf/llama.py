"""Llama / Mistral <-> seqlm: RMSNorm pre-norm, RoPE (rotate-half, permuted to seqlm's
interleaved pairs), GQA, SwiGLU; each HF layer is two seqlm layers ``*-`` (attention, mlp)."""
from __future__ import annotations

from seqlm.io.hf.common import (act, attn_in, attn_out, block_sd, half_to_pairs, no_topology, put_block, put_norm,
                                refuse, rope_params, take, uniform, UnsupportedHF)

MODEL_TYPES = ("llama", "mistral")


def to_seqlm(hc: dict, sd: dict, src):
    D, L, H = hc["hidden_size"], hc["num_hidden_layers"], hc["num_attention_heads"]
    Hkv = hc.get("num_key_value_heads") or H
    hd = hc.get("head_dim") or D // H
    act(src, "hidden_act", hc.get("hidden_act", "silu"), {"silu": "swiglu"})
    theta, frac = rope_params(hc, src)
    if frac != 1.0:
        refuse(src, "partial_rotary_factor", f"{frac} is not supported for {hc['model_type']}")
    window = hc.get("sliding_window") if hc["model_type"] == "mistral" else None
    bias = bool(hc.get("attention_bias", False))
    attn = {"type": "attention", "n_heads": H, "n_kv_heads": Hkv, "head_dim": hd, "rope_theta": theta,
            "bias": bias, "window": window}
    mlp = {"type": "mlp", "kind": "swiglu", "hidden": hc["intermediate_size"], "bias": bool(hc.get("mlp_bias", False))}
    tied = bool(hc.get("tie_word_embeddings", False))
    mcfg = {"vocab_size": hc["vocab_size"], "d_model": D, "layers": [attn, mlp] * L, "norm": "rmsnorm",
            "norm_eps": hc.get("rms_norm_eps", 1e-6), "tie_embeddings": tied}
    perm = half_to_pairs(hd)
    out = {"embed.weight": take(sd, "model.embed_tokens.weight", src)}
    for i in range(L):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        w = [take(sd, a + f"{n}_proj.weight", src) for n in "qkvo"]
        b = [take(sd, a + f"{n}_proj.bias", src) for n in "qkvo"] if bias else None
        put_block(out, 2 * i, attn_in(*w, b, H, Hkv, perm))
        m = p + "mlp."
        mt = {"gate_proj.weight": take(sd, m + "gate_proj.weight", src),
              "up_proj.weight": take(sd, m + "up_proj.weight", src),
              "out_proj.weight": take(sd, m + "down_proj.weight", src)}
        if mlp["bias"]:
            mt.update({"gate_proj.bias": take(sd, m + "gate_proj.bias", src),
                       "up_proj.bias": take(sd, m + "up_proj.bias", src),
                       "out_proj.bias": take(sd, m + "down_proj.bias", src)})
        put_block(out, 2 * i + 1, mt)
        put_norm(out, 2 * i, take(sd, p + "input_layernorm.weight", src))
        put_norm(out, 2 * i + 1, take(sd, p + "post_attention_layernorm.weight", src))
    out["norm_f.weight"] = take(sd, "model.norm.weight", src)
    out["head.weight"] = out["embed.weight"] if tied else take(sd, "lm_head.weight", src)
    sd.pop("lm_head.weight", None)  # tied models may store it too
    for k in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        sd.pop(k)
    return mcfg, out


def check_pairs(mcfg, what: str) -> int:
    """Layers must alternate attention, mlp: returns the number of pairs."""
    types = [s.type for s in mcfg.layers]
    if len(types) % 2 or any(t != ("attention" if i % 2 == 0 else "mlp") for i, t in enumerate(types)):
        raise UnsupportedHF(f"model.layers: {what} needs alternating attention, mlp layers ('*-'), got "
                            f"{''.join({'attention': '*', 'mlp': '-'}.get(t, '?') for t in types)!r}")
    return len(types) // 2


def from_seqlm(mcfg, sd: dict, V: int, eos_id: int):
    no_topology(mcfg, "Llama")
    L = check_pairs(mcfg, "Llama/Mistral export")
    at, ml = uniform(mcfg, "attention", "Llama export"), uniform(mcfg, "mlp", "Llama export")
    if mcfg.norm != "rmsnorm":
        raise UnsupportedHF(f"model.norm: Llama uses rmsnorm, got {mcfg.norm!r}")
    if mcfg.pos_embedding != "none" or mcfg.parallel_residual:
        raise UnsupportedHF("model.pos_embedding / parallel_residual: not representable in Llama")
    if not at.rope or (at.rotary_dim is not None):
        raise UnsupportedHF("model.layers[0].rope: Llama export needs full RoPE (rope: true, rotary_dim: null)")
    if ml.kind != "swiglu":
        raise UnsupportedHF(f"model.layers[1].kind: Llama uses swiglu, got {ml.kind!r}")
    D, H = mcfg.d_model, at.n_heads
    Hkv, hd = at.n_kv_heads or H, at.head_dim or mcfg.d_model // at.n_heads
    mistral = at.window is not None
    if mistral and (at.bias or ml.bias):
        raise UnsupportedHF("model.layers[*].bias: Mistral (sliding window) has no biases")
    hidden = sd["stack.blocks.1.up_proj.weight"].shape[0]
    hc = {"architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
          "model_type": "mistral" if mistral else "llama", "vocab_size": V, "hidden_size": D,
          "intermediate_size": hidden, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": Hkv,
          "head_dim": hd, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": mcfg.norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": at.rope_theta},
          "tie_word_embeddings": mcfg.tie_embeddings, "eos_token_id": eos_id, "bos_token_id": None,
          "torch_dtype": "float32"}
    if mistral:
        hc["sliding_window"] = at.window
    else:
        hc.update(attention_bias=at.bias, mlp_bias=ml.bias)
    perm = half_to_pairs(hd)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(L):
        p = f"model.layers.{i}."
        (q, k, v, o), b = attn_out(block_sd(sd, 2 * i), H, Hkv, hd, perm)
        for n, t in zip("qkvo", (q, k, v, o)):
            out[p + f"self_attn.{n}_proj.weight"] = t
        if b is not None:
            for n, t in zip("qkvo", b):
                out[p + f"self_attn.{n}_proj.bias"] = t
        m = block_sd(sd, 2 * i + 1)
        for ours, theirs in (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("out_proj", "down_proj")):
            out[p + f"mlp.{theirs}.weight"] = m[f"{ours}.weight"]
            if f"{ours}.bias" in m:
                out[p + f"mlp.{theirs}.bias"] = m[f"{ours}.bias"]
        out[p + "input_layernorm.weight"] = sd[f"stack.norms.{2 * i}.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[f"stack.norms.{2 * i + 1}.weight"]
    return hc, out
