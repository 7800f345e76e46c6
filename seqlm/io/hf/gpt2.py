"""GPT-2 <-> seqlm: learned absolute positions, LayerNorm with bias, tanh-GELU MLP, biases
everywhere, Conv1D weights stored (in, out) (transposed here). Layers ``*-``."""
from __future__ import annotations

from seqlm.io.hf.common import (UnsupportedHF, act, block_sd, check_equal, no_topology, put_block, put_norm, take,
                                uniform)
from seqlm.io.hf.llama import check_pairs

MODEL_TYPES = ("gpt2",)
_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu2": "relu2"}


def to_seqlm(hc: dict, sd: dict, src):
    D, L, H = hc["n_embd"], hc["n_layer"], hc["n_head"]
    kind = act(src, "activation_function", hc.get("activation_function", "gelu_new"), _ACTS)
    check_equal(src, "scale_attn_weights", hc.get("scale_attn_weights", True), True)
    check_equal(src, "scale_attn_by_inverse_layer_idx", hc.get("scale_attn_by_inverse_layer_idx", False), False)
    if hc.get("add_cross_attention"):
        check_equal(src, "add_cross_attention", True, False)
    hidden = hc.get("n_inner") or 4 * D
    attn = {"type": "attention", "n_heads": H, "rope": False, "bias": True}
    mlp = {"type": "mlp", "kind": kind, "hidden": hidden, "bias": True}
    tied = bool(hc.get("tie_word_embeddings", True))
    mcfg = {"vocab_size": hc["vocab_size"], "d_model": D, "layers": [attn, mlp] * L, "norm": "layernorm",
            "norm_eps": hc.get("layer_norm_epsilon", 1e-5), "tie_embeddings": tied, "pos_embedding": "learned",
            "max_positions": hc.get("n_positions", 1024)}
    # GPT2LMHeadModel saves "transformer."-prefixed keys; the original checkpoints have none
    for k in list(sd):
        if k.startswith("transformer."):
            sd[k[len("transformer."):]] = sd.pop(k)
    for k in [k for k in sd if k.endswith((".attn.bias", ".attn.masked_bias")) and sd[k].dim() != 1]:
        sd.pop(k)
    out = {"embed.weight": take(sd, "wte.weight", src), "pos_embed.weight": take(sd, "wpe.weight", src)}
    for i in range(L):
        p = f"h.{i}."
        put_block(out, 2 * i, {"qkv_proj.weight": take(sd, p + "attn.c_attn.weight", src).t(),
                               "qkv_proj.bias": take(sd, p + "attn.c_attn.bias", src),
                               "out_proj.weight": take(sd, p + "attn.c_proj.weight", src).t(),
                               "out_proj.bias": take(sd, p + "attn.c_proj.bias", src)})
        put_block(out, 2 * i + 1, {"up_proj.weight": take(sd, p + "mlp.c_fc.weight", src).t(),
                                   "up_proj.bias": take(sd, p + "mlp.c_fc.bias", src),
                                   "out_proj.weight": take(sd, p + "mlp.c_proj.weight", src).t(),
                                   "out_proj.bias": take(sd, p + "mlp.c_proj.bias", src)})
        put_norm(out, 2 * i, take(sd, p + "ln_1.weight", src), take(sd, p + "ln_1.bias", src))
        put_norm(out, 2 * i + 1, take(sd, p + "ln_2.weight", src), take(sd, p + "ln_2.bias", src))
    out["norm_f.weight"], out["norm_f.bias"] = take(sd, "ln_f.weight", src), take(sd, "ln_f.bias", src)
    out["head.weight"] = out["embed.weight"] if tied else take(sd, "lm_head.weight", src)
    sd.pop("lm_head.weight", None)
    return mcfg, out


def from_seqlm(mcfg, sd: dict, V: int, eos_id: int):
    no_topology(mcfg, "GPT-2")
    L = check_pairs(mcfg, "GPT-2 export")
    at, ml = uniform(mcfg, "attention", "GPT-2 export"), uniform(mcfg, "mlp", "GPT-2 export")
    inv = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}
    problems = []
    if mcfg.norm != "layernorm":
        problems.append(f"model.norm: GPT-2 uses layernorm, got {mcfg.norm!r}")
    if at.rope or at.window or not at.bias or (at.n_kv_heads or at.n_heads) != at.n_heads or at.head_dim:
        problems.append("model.layers[0]: GPT-2 attention has no rope/window/GQA/head_dim and needs bias: true")
    if ml.kind not in inv or not ml.bias:
        problems.append(f"model.layers[1].kind: GPT-2 needs a two-matrix MLP with bias, got {ml.kind!r}")
    if mcfg.parallel_residual:
        problems.append("model.parallel_residual: GPT-2 is sequential")
    if problems:
        raise UnsupportedHF("; ".join(problems))
    D = mcfg.d_model
    hidden = sd["stack.blocks.1.up_proj.weight"].shape[0]
    hc = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_embd": D, "n_layer": L,
          "n_head": at.n_heads, "n_inner": hidden, "n_positions": mcfg.max_positions,
          "activation_function": inv[ml.kind], "layer_norm_epsilon": mcfg.norm_eps,
          "tie_word_embeddings": mcfg.tie_embeddings, "eos_token_id": eos_id, "bos_token_id": eos_id,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "torch_dtype": "float32"}
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"]}
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(L):
        p = f"transformer.h.{i}."
        a, m = block_sd(sd, 2 * i), block_sd(sd, 2 * i + 1)
        out.update({p + "attn.c_attn.weight": a["qkv_proj.weight"].t(), p + "attn.c_attn.bias": a["qkv_proj.bias"],
                    p + "attn.c_proj.weight": a["out_proj.weight"].t(), p + "attn.c_proj.bias": a["out_proj.bias"],
                    p + "mlp.c_fc.weight": m["up_proj.weight"].t(), p + "mlp.c_fc.bias": m["up_proj.bias"],
                    p + "mlp.c_proj.weight": m["out_proj.weight"].t(), p + "mlp.c_proj.bias": m["out_proj.bias"]})
        for j, n in ((2 * i, "ln_1"), (2 * i + 1, "ln_2")):
            out[p + f"{n}.weight"], out[p + f"{n}.bias"] = sd[f"stack.norms.{j}.weight"], sd[f"stack.norms.{j}.bias"]
    return hc, out
