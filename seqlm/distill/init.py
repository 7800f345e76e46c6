"""The student built from the teacher: its config (``distill.from_teacher``) and its weights.

Everything but the converted layers is copied (embedding, norms, MLPs, kept attention layers,
final norm, head). An attention layer (H query heads, Hkv kv heads of width hd, GQA kv heads
repeated to H: head h reads kv head h // (H / Hkv)) becomes:

- **Mamba-2** (Mamba-in-the-Llama, Wang et al. 2024): expand = H*hd / d_model, head_dim =
  d_state = hd, ngroups = H (one B/C group per head). in_proj's x rows <- W_v, B rows <- W_k,
  C rows <- W_q; out_proj <- W_o. New: z, dt (dt_bias), A_log, D, the gated norm (ones), and
  the conv, which starts as the identity tap (so x, B, C start as SiLU of the attention's v, k,
  q projections). RoPE and the 1/sqrt(hd) scale have no counterpart and are dropped.
- **Mamba** (analogous): expand = H*hd / d_model, d_state = hd. in_proj's x rows <- W_v;
  out_proj <- W_o. Mamba computes B and C from the conv'd x (one B/C shared by all channels),
  so x_proj's B rows <- mean_h(W_k,h) W_v^+ and C rows <- mean_h(W_q,h) W_v^+ (least squares:
  B reproduces the head-averaged key from the value projection exactly when W_v is invertible).
  New: z, dt, A_log, D; the conv starts as the identity tap.
- **H3** (analogous; H3 is attention with SSMs in place of the softmax): q/k/v/out_proj <-
  W_q/W_k/W_v/W_o; head_dim defaults to hd. New: the SSM parameters; the shift SSM starts as the
  identity tap (k passes unchanged).
"""
from __future__ import annotations

import re

import torch

from seqlm import registry
from seqlm.config import ConfigError, ModelConfig

FIELD = "distill.from_teacher"


def _attn_geometry(spec, d_model: int):
    hd = spec.head_dim or d_model // spec.n_heads
    return spec.n_heads, (spec.n_kv_heads or spec.n_heads), hd


def _mapped_spec(kind: str, spec, d_model: int, user: dict, i: int):
    H, _, hd = _attn_geometry(spec, d_model)
    width = H * hd
    if kind in ("mamba2", "mamba") and width % d_model:
        raise ConfigError(f"{FIELD}.pattern[{i}]: n_heads*head_dim={width} is not a multiple of "
                          f"d_model={d_model}; the {kind} mapping needs expand = n_heads*head_dim/d_model")
    if kind == "h3" and width != d_model:
        raise ConfigError(f"{FIELD}.pattern[{i}]: the h3 mapping needs n_heads*head_dim == d_model, got {width}")
    if kind == "mamba2":
        fixed = {"expand": width // d_model, "head_dim": hd, "d_state": hd, "ngroups": H, "bias": spec.bias}
    elif kind == "mamba":
        fixed = {"expand": width // d_model, "d_state": hd, "bias": spec.bias}
    elif kind == "h3":
        fixed = {"bias": spec.bias}
        user = {"head_dim": hd, **user}
    else:
        raise ConfigError(f"{FIELD}.pattern[{i}]: no attention -> {kind} mapping (have mamba2, mamba, h3; "
                          f"`.` or `*` keeps the attention layer)")
    clash = sorted(k for k in user if k in fixed and user[k] != fixed[k])
    if clash:
        raise ConfigError(f"{FIELD}.block_defaults.{kind}.{clash[0]}: fixed by the attention -> {kind} "
                          f"mapping to {fixed[clash[0]]!r}")
    return {**user, **fixed, "type": kind}


def student_config(teacher_cfg: ModelConfig, ft) -> tuple[ModelConfig, list[int]]:
    """(student ModelConfig, indices of the converted layers) for ``distill.from_teacher``."""
    if teacher_cfg.recursive is not None:
        raise ConfigError(f"{FIELD}: the teacher is recursive (model.recursive); convert an unshared teacher")
    layers = teacher_cfg.layers or []
    n, p = len(layers), ft.pattern
    if n % len(p):
        raise ConfigError(f"{FIELD}.pattern: the teacher has {n} layers, not a multiple of len(pattern)={len(p)}")
    full = p * (n // len(p))
    chars = registry.pattern_chars()
    for name in ft.block_defaults:
        if name not in registry.blocks():
            raise ConfigError(f"{FIELD}.block_defaults.{name}: unknown block type")
    out, pairs = [], []
    for i, (ch, spec) in enumerate(zip(full, layers)):
        if ch == "." or chars[ch] == spec.type:
            out.append(spec.model_dump())
            continue
        if spec.type != "attention":
            raise ConfigError(f"{FIELD}.pattern[{i % len(p)}]: teacher layer {i} is {spec.type!r}; only "
                              f"attention layers can be converted (use `.` to keep it)")
        out.append(_mapped_spec(chars[ch], spec, teacher_cfg.d_model, dict(ft.block_defaults.get(chars[ch], {})), i))
        pairs.append(i)
    data = teacher_cfg.model_dump()
    data.update(layers=out, pattern=None, block_defaults={}, n_layers=n)
    try:
        return ModelConfig.model_validate(data), pairs
    except Exception as e:  # noqa: BLE001 - a bad block_defaults value
        raise ConfigError(f"{FIELD}: the student config is invalid: {e}") from None


# -------------------------------------------------------------------------------------------
# weights

def attention_weights(a):
    """An attention block's (W_q, W_k, W_v, b_q, b_k, b_v): each (H*hd, D) / (H*hd,), kv heads
    repeated to H (GQA); biases None without bias."""
    H, Hkv, hd = a.n_heads, a.n_kv, a.hd
    rep = H // Hkv

    def split(t):
        q, k, v = t.split([H * hd, Hkv * hd, Hkv * hd])
        k = k.unflatten(0, (Hkv, hd)).repeat_interleave(rep, 0).flatten(0, 1)
        v = v.unflatten(0, (Hkv, hd)).repeat_interleave(rep, 0).flatten(0, 1)
        return q, k, v

    Wq, Wk, Wv = split(a.qkv_proj.weight)
    bq, bk, bv = split(a.qkv_proj.bias) if a.qkv_proj.bias is not None else (None, None, None)
    return Wq, Wk, Wv, bq, bk, bv


def _identity_tap(weight, bias) -> None:
    weight.zero_()
    weight[:, -1] = 1.0
    if bias is not None:
        bias.zero_()


def _copy_linear_out(dst, src) -> None:
    dst.weight.copy_(src.weight)
    if dst.bias is not None and src.bias is not None:
        dst.bias.copy_(src.bias)


def map_mamba2(m, a) -> None:
    Wq, Wk, Wv, bq, bk, bv = attention_weights(a)
    d, gn = m.d_inner, m.G * m.N
    rows = {"x": slice(d, 2 * d), "B": slice(2 * d, 2 * d + gn), "C": slice(2 * d + gn, 2 * d + 2 * gn)}
    for part, W, b in (("x", Wv, bv), ("B", Wk, bk), ("C", Wq, bq)):
        m.in_proj.weight[rows[part]] = W
        if m.in_proj.bias is not None and b is not None:
            m.in_proj.bias[rows[part]] = b
    _copy_linear_out(m.out_proj, a.out_proj)
    _identity_tap(m.conv_weight, m.conv_bias)


def map_mamba(m, a) -> None:
    Wq, Wk, Wv, bq, bk, bv = attention_weights(a)
    d, H, hd = m.d_inner, a.n_heads, a.hd
    m.in_proj.weight[:d] = Wv
    if m.in_proj.bias is not None and bv is not None:
        m.in_proj.bias[:d] = bv
    pinv = torch.linalg.pinv(Wv.double())                                # (D, d_inner)
    R, N = m.R, m.N
    m.x_proj.weight[R:R + N] = (Wk.double().view(H, hd, -1).mean(0) @ pinv).to(m.x_proj.weight.dtype)
    m.x_proj.weight[R + N:] = (Wq.double().view(H, hd, -1).mean(0) @ pinv).to(m.x_proj.weight.dtype)
    _copy_linear_out(m.out_proj, a.out_proj)
    _identity_tap(m.conv_weight, m.conv_bias)


def map_h3(m, a) -> None:
    Wq, Wk, Wv, bq, bk, bv = attention_weights(a)
    for lin, W, b in ((m.q_proj, Wq, bq), (m.k_proj, Wk, bk), (m.v_proj, Wv, bv)):
        lin.weight.copy_(W)
        if lin.bias is not None and b is not None:
            lin.bias.copy_(b)
    _copy_linear_out(m.out_proj, a.out_proj)
    _identity_tap(m.shift_weight, None)


MAPPINGS = {"mamba2": map_mamba2, "mamba": map_mamba, "h3": map_h3}


@torch.no_grad()
def init_from_teacher(student, teacher, pairs: list[int]) -> None:
    """Copy every parameter outside the converted layers, then map each converted layer."""
    t_sd = teacher.state_dict()
    conv = re.compile(r"stack\.blocks\.(\d+)\.")
    for name, p in student.state_dict().items():
        m = conv.match(name)
        if m and int(m.group(1)) in pairs:
            continue
        src = t_sd.get(name)
        if src is None or src.shape != p.shape:
            raise ValueError(f"{FIELD}: student parameter {name} {tuple(p.shape)} has no counterpart in the "
                             f"teacher ({None if src is None else tuple(src.shape)})")
        p.copy_(src)
    for i in pairs:
        s, t = student.stack.blocks[i], teacher.stack.blocks[i]
        MAPPINGS[s.name](s, t)
