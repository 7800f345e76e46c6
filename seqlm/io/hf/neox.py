"""GPT-NeoX / Pythia <-> seqlm: LayerNorm with bias, partial rotary (rotate-half on the first
rotary_dim channels, permuted to interleaved pairs), fused per-head qkv, GELU MLP, parallel
residual (``model.parallel_residual``) or sequential; untied head. Layers ``*-``."""
from __future__ import annotations

import torch

from seqlm.io.hf.common import (UnsupportedHF, act, attn_in, attn_out, block_sd, half_to_pairs, no_topology,
                                put_block, put_norm, rope_params, take, uniform)
from seqlm.io.hf.llama import check_pairs

MODEL_TYPES = ("gpt_neox",)
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}


def to_seqlm(hc: dict, sd: dict, src):
    D, L, H = hc["hidden_size"], hc["num_hidden_layers"], hc["num_attention_heads"]
    hd = D // H
    kind = act(src, "hidden_act", hc.get("hidden_act", "gelu"), _ACTS)
    theta, frac = rope_params(hc, src)
    rot = int(hd * frac)
    bias = bool(hc.get("attention_bias", True))
    attn = {"type": "attention", "n_heads": H, "rope_theta": theta, "bias": bias,
            "rotary_dim": None if rot == hd else rot}
    mlp = {"type": "mlp", "kind": kind, "hidden": hc["intermediate_size"], "bias": True}
    tied = bool(hc.get("tie_word_embeddings", False))
    mcfg = {"vocab_size": hc["vocab_size"], "d_model": D, "layers": [attn, mlp] * L, "norm": "layernorm",
            "norm_eps": hc.get("layer_norm_eps", 1e-5), "tie_embeddings": tied,
            "parallel_residual": bool(hc.get("use_parallel_residual", True))}
    perm = half_to_pairs(hd, rot)
    out = {"embed.weight": take(sd, "gpt_neox.embed_in.weight", src)}
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        w = take(sd, p + "attention.query_key_value.weight", src).view(H, 3, hd, D)  # per head [q k v]
        ws = [w[:, j].reshape(H * hd, D) for j in range(3)] + [take(sd, p + "attention.dense.weight", src)]
        bs = None
        if bias:
            b = take(sd, p + "attention.query_key_value.bias", src).view(H, 3, hd)
            bs = [b[:, j].reshape(H * hd) for j in range(3)] + [take(sd, p + "attention.dense.bias", src)]
        put_block(out, 2 * i, attn_in(*ws, bs, H, H, perm))
        put_block(out, 2 * i + 1, {"up_proj.weight": take(sd, p + "mlp.dense_h_to_4h.weight", src),
                                   "up_proj.bias": take(sd, p + "mlp.dense_h_to_4h.bias", src),
                                   "out_proj.weight": take(sd, p + "mlp.dense_4h_to_h.weight", src),
                                   "out_proj.bias": take(sd, p + "mlp.dense_4h_to_h.bias", src)})
        put_norm(out, 2 * i, take(sd, p + "input_layernorm.weight", src), take(sd, p + "input_layernorm.bias", src))
        put_norm(out, 2 * i + 1, take(sd, p + "post_attention_layernorm.weight", src),
                 take(sd, p + "post_attention_layernorm.bias", src))
        for k in ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"):
            sd.pop(p + k, None)
    out["norm_f.weight"] = take(sd, "gpt_neox.final_layer_norm.weight", src)
    out["norm_f.bias"] = take(sd, "gpt_neox.final_layer_norm.bias", src)
    out["head.weight"] = out["embed.weight"] if tied else take(sd, "embed_out.weight", src)
    sd.pop("embed_out.weight", None)
    sd.pop("gpt_neox.rotary_emb.inv_freq", None)
    return mcfg, out


def from_seqlm(mcfg, sd: dict, V: int, eos_id: int):
    no_topology(mcfg, "GPT-NeoX")
    L = check_pairs(mcfg, "GPT-NeoX export")
    at, ml = uniform(mcfg, "attention", "GPT-NeoX export"), uniform(mcfg, "mlp", "GPT-NeoX export")
    inv = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}
    D, H = mcfg.d_model, at.n_heads
    hd = D // H
    problems = []
    if mcfg.norm != "layernorm":
        problems.append(f"model.norm: GPT-NeoX uses layernorm, got {mcfg.norm!r}")
    if not at.rope or at.window or (at.n_kv_heads or H) != H or (at.head_dim or hd) != hd:
        problems.append("model.layers[0]: GPT-NeoX attention needs rope, no window/GQA, head_dim = d_model/n_heads")
    if ml.kind not in inv or not ml.bias:
        problems.append(f"model.layers[1]: GPT-NeoX needs a two-matrix MLP with bias, got kind {ml.kind!r}")
    if mcfg.pos_embedding != "none":
        problems.append("model.pos_embedding: GPT-NeoX has no learned positions")
    if problems:
        raise UnsupportedHF("; ".join(problems))
    rot = at.rotary_dim or hd
    hc = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": V, "hidden_size": D,
          "num_hidden_layers": L, "num_attention_heads": H, "intermediate_size": sd["stack.blocks.1.up_proj.weight"].shape[0],
          "hidden_act": inv[ml.kind], "layer_norm_eps": mcfg.norm_eps, "use_parallel_residual": mcfg.parallel_residual,
          "attention_bias": at.bias, "max_position_embeddings": 131072,
          "rope_parameters": {"rope_type": "default", "rope_theta": at.rope_theta, "partial_rotary_factor": rot / hd},
          "tie_word_embeddings": mcfg.tie_embeddings, "eos_token_id": eos_id, "bos_token_id": eos_id,
          "hidden_dropout": 0.0, "attention_dropout": 0.0, "torch_dtype": "float32"}
    perm = half_to_pairs(hd, rot)
    out = {"gpt_neox.embed_in.weight": sd["embed.weight"], "gpt_neox.final_layer_norm.weight": sd["norm_f.weight"],
           "gpt_neox.final_layer_norm.bias": sd["norm_f.bias"]}
    if not mcfg.tie_embeddings:
        out["embed_out.weight"] = sd["head.weight"]
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        (q, k, v, o), b = attn_out(block_sd(sd, 2 * i), H, H, hd, perm)
        out[p + "attention.query_key_value.weight"] = torch.stack(
            [t.view(H, hd, D) for t in (q, k, v)], 1).reshape(3 * H * hd, D)
        out[p + "attention.dense.weight"] = o
        if b is not None:
            out[p + "attention.query_key_value.bias"] = torch.stack([t.view(H, hd) for t in b[:3]], 1).reshape(-1)
            out[p + "attention.dense.bias"] = b[3]
        m = block_sd(sd, 2 * i + 1)
        out.update({p + "mlp.dense_h_to_4h.weight": m["up_proj.weight"], p + "mlp.dense_h_to_4h.bias": m["up_proj.bias"],
                    p + "mlp.dense_4h_to_h.weight": m["out_proj.weight"], p + "mlp.dense_4h_to_h.bias": m["out_proj.bias"]})
        for j, n in ((2 * i, "input_layernorm"), (2 * i + 1, "post_attention_layernorm")):
            out[p + f"{n}.weight"], out[p + f"{n}.bias"] = sd[f"stack.norms.{j}.weight"], sd[f"stack.norms.{j}.bias"]
    return hc, out
