"""Relaxed recursive sharing (seqlm/recursive.py, seqlm/stack.py): SVD conversion at full rank
reproduces the unshared model, rank 0 is one tensor per shared Linear, LoRA is owned per depth,
every block type (incl. Mamba-2) works, the CLI converts a trained checkpoint, tp_plan covers
every 2-D weight, and recursive + ladder compose inside HMT from one YAML."""
import json
import re

import pytest
import torch

from seqlm import registry
from seqlm.blocks.plan import lora_specs
from seqlm.config import ConfigError, dump_config, load_config, parse_config
from seqlm.io import build_model, load_model
from seqlm.io.convert import convert_recursive
from seqlm.model import LM

V, B, T = 19, 2, 10
NAMES = sorted(registry.blocks())
CHAR = {name: c for c, name in registry.pattern_chars().items()}


def model_dict(name="mamba2", n_layers=6, **extra):
    pattern = CHAR[name] + ("" if name == "mlp" else "-")
    return {"d_model": 32, "pattern": pattern, "n_layers": n_layers,
            "block_defaults": {"attention": {"n_heads": 2}}, **extra}


def build(name="mamba2", dtype=torch.float64, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = parse_config({"model": model_dict(name, **extra)})
    return LM(cfg.model, V).to(dtype).eval(), cfg


def perturb_lora(model, scale=0.1):
    with torch.no_grad():  # fresh LoRA B is zero; make every adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, scale)


# -- config ----------------------------------------------------------------------------------
def test_config_validates_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.layers\[3\]: runs shared block 0 .*type='mlp' vs 'mamba2'"):
        parse_config({"model": model_dict("mamba2", recursive={"groups": 3})})
    with pytest.raises(ConfigError, match=r"model\.recursive\.groups: 7 exceeds n_layers=6"):
        parse_config({"model": model_dict("mamba2", recursive={"groups": 7})})
    with pytest.raises(ConfigError, match=r"model\.recursive\.lora_rank"):
        parse_config({"model": model_dict("mamba2", recursive={"groups": 2, "lora_rank": -1})})
    layers = [{"type": "mlp"}, {"type": "mlp", "hidden": 64}, {"type": "mlp", "hidden": 64}]
    with pytest.raises(ConfigError, match=r"model\.layers\[1\]: .*hidden=64 vs None"):
        parse_config({"model": {"layers": layers, "recursive": {"groups": 1}}})
    cfg = parse_config({"model": model_dict("mamba2", recursive={"groups": 2, "lora_rank": 4, "lora_alpha": 8.0},
                                            residual="ladder")})
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg and cfg.model.recursive.init == "average"


# -- conversion ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,init", [(n, "average") for n in NAMES] + [("mamba2", "first"), ("attention", "first")])
def test_full_rank_conversion_reproduces_logits(name, init):
    model, cfg = build(name)
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref, _ = model(x)
        conv, new_cfg = convert_recursive(model, cfg, groups=2, rank=10_000, init=init)
        got, _ = conv(x)
        low, _ = convert_recursive(model, cfg, groups=2, rank=2, init=init)[0](x)
    assert new_cfg.model.recursive.groups == 2 and new_cfg.model.recursive.init == init
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert (low - ref).abs().amax() > 1e-4  # a truncated rank is an approximation: the test can fail
    # the shared weights are the average (or the first) of the tied layers
    w = [model.stack.blocks[l].out_proj.weight for l in (0, 2, 4)]
    want = torch.stack(w).mean(0) if init == "average" else w[0]
    torch.testing.assert_close(conv.stack.blocks[0].out_proj.weight, want)


def test_truncated_svd_is_the_best_low_rank_residual():
    model, cfg = build("mlp", n_layers=4)
    conv, _ = convert_recursive(model, cfg, groups=1, rank=3)
    W = [model.stack.blocks[l].up_proj.weight for l in range(4)]
    Wp = conv.stack.blocks[0].up_proj.weight
    torch.testing.assert_close(Wp, torch.stack(W).mean(0))
    for l in range(4):
        A, Bm = conv.stack.depths[l].lora_AB("up_proj")
        S = torch.linalg.svdvals(W[l] - Wp)
        err = torch.linalg.matrix_norm(W[l] - Wp - Bm @ A)  # Eckart-Young: the tail singular values
        torch.testing.assert_close(err, S[3:].norm())


# -- sharing -----------------------------------------------------------------------------------
def test_rank0_is_one_tensor_per_shared_linear():
    model, _ = build("mamba2", recursive={"groups": 2, "lora_rank": 0})
    unshared, _ = build("mamba2")
    stack = model.stack
    assert len(stack.blocks) == 2 and len(stack) == 6
    for i in range(6):
        _, blk, ctx = stack.layer(i)
        assert blk is stack.blocks[i % 2]
        with ctx:
            seen = blk.out_proj.weight
        assert seen is stack.blocks[i % 2].out_proj.weight  # no copy, no merge: the Parameter itself
    ptrs = {stack.layer(i)[1].in_proj.weight.data_ptr() for i in (0, 2, 4)}
    assert len(ptrs) == 1
    names = [n for n, _ in model.named_parameters() if n.endswith("in_proj.weight")]
    assert names == ["stack.blocks.0.in_proj.weight"]
    lin = sum(m.weight.numel() for m in unshared.stack.modules() if isinstance(m, torch.nn.Linear))
    shared = sum(m.weight.numel() for m in stack.modules() if isinstance(m, torch.nn.Linear))
    assert shared * 3 == lin and model.num_params() == unshared.num_params() - (lin - shared)


def test_lora_is_owned_per_depth():
    model, _ = build("mamba2", recursive={"groups": 2, "lora_rank": 4})
    perturb_lora(model)
    d = model.stack.depths
    A0, B0 = d[0].lora_AB("in_proj")
    A2, B2 = d[2].lora_AB("in_proj")
    assert A0 is not A2 and A0.data_ptr() != A2.data_ptr() and A0.shape == (4, 32)
    assert not torch.equal(B0, B2)
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref, _ = model(x)
        B2.add_(0.5)  # in place under no_grad: the merged-weight cache must notice
        moved, _ = model(x)
        B2.sub_(0.5)
        back, _ = model(x)
    assert (moved - ref).abs().amax() > 1e-4
    torch.testing.assert_close(back, ref, rtol=0, atol=1e-12)
    # each depth's adapters get their own gradient
    model.train()
    model.loss(x, x).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert not torch.allclose(A0.grad, A2.grad)


@pytest.mark.parametrize("name", NAMES)
def test_recursive_forward_equals_steps_and_tp_plan(name):
    model, _ = build(name, recursive={"groups": 2, "lora_rank": 3}, residual="ladder")
    perturb_lora(model)
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref, _ = model(x)
        st = model.init_state(B, T)
        y1, st = model(x[:, :4], st)
        outs = [y1]
        for t in range(4, T):
            y, st = model.step(x[:, t:t + 1], st)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-8, atol=1e-10)
    plan = model.tp_plan()
    for n, p in model.named_parameters():  # every parameter, once (seqlm/blocks/plan.py)
        hits = [k for k in plan if re.fullmatch(k, n)]
        assert len(hits) == 1, (n, hits)
        if n.endswith("__lora_B") or n.endswith("__lora_A"):  # LoRA follows its base
            depth, key = int(n.split(".")[2]), n.split(".")[3]
            base_name = f"stack.blocks.{depth % 2}." + key.rsplit("__lora_", 1)[0].replace("__", ".") + ".weight"
            base = [v for k, v in plan.items() if re.fullmatch(k, base_name)]
            assert len(base) == 1, base_name
            assert plan[hits[0]] == lora_specs(base[0])[0 if n.endswith("__lora_A") else 1], n


# -- CLI ---------------------------------------------------------------------------------------
def _train_tiny(tmp_path, model_d):
    from seqlm.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i % 5} pack my box with five dozen liquor jugs.\n" for i in range(80)))
    d = {"model": model_d, "data": {"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
         "train": {"seq_len": 16, "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "lr": 1e-2,
                   "out_dir": str(tmp_path / "run"), "progress": False},
         "eval": {"every": 0, "batches": 1, "sample_tokens": 0}}
    return train(parse_config(d))["checkpoint"]


def test_cli_converts_a_trained_checkpoint(tmp_path, capsys):
    from seqlm.cli import main

    ck = _train_tiny(tmp_path, model_dict("mamba2", n_layers=4))
    orig, _, tok = load_model(ck)
    x = torch.tensor([tok.encode("pack my box with five")])
    with torch.no_grad():
        ref, _ = orig(x)
    capsys.readouterr()
    out = tmp_path / "rec"
    assert main(["convert", "recursive", "--checkpoint", ck, "--groups", "2", "--rank", "64",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    before = int(re.search(r"parameters before: ([\d,]+)", text).group(1).replace(",", ""))
    after = int(re.search(r"parameters after: +([\d,]+)", text).group(1).replace(",", ""))
    conv, cfg, _ = load_model(out)  # the normal loader
    assert before == orig.num_params() and after == conv.num_params()
    assert cfg.model.recursive.groups == 2 and len(conv.stack.blocks) == 2
    with torch.no_grad():
        got, _ = conv(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # fp32, full rank
    assert json.loads((out / "meta.json").read_text())["converted_from"] == ck
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "pack my", "--max-new-tokens", "8",
                 "--temperature", "0", "--quiet"]) == 0  # the cached step path of a converted model
    want = orig.generate(torch.tensor(tok.encode("pack my")), 8, temperature=0.0)
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(want.tolist())
    # rank 0: fewer parameters than the original, and a different (approximate) function
    assert main(["convert", "recursive", "--checkpoint", ck, "--groups", "1", "--rank", "0",
                 "--out", str(tmp_path / "r0")]) == 2  # layers 0 and 1 differ: one group cannot tie them
    assert "model.layers[1]: runs shared block 0" in capsys.readouterr().err
    assert main(["convert", "recursive", "--checkpoint", ck, "--groups", "2", "--rank", "0", "--init", "first",
                 "--out", str(tmp_path / "r0")]) == 0
    r0, _, _ = load_model(tmp_path / "r0")
    assert r0.num_params() < orig.num_params()
    assert main(["convert", "recursive", "--checkpoint", str(tmp_path / "r0"), "--groups", "2", "--rank", "0",
                 "--out", str(tmp_path / "again")]) == 2  # already recursive
    assert main(["convert", "recursive", "--checkpoint", str(tmp_path / "nowhere"), "--groups", "2",
                 "--rank", "0", "--out", str(tmp_path / "x")]) == 2


# -- composition -------------------------------------------------------------------------------
YAML = """
model:
  d_model: 32
  pattern: "2-"
  n_layers: 6
  residual: ladder
  recursive: {groups: 2, lora_rank: 4}
  block_defaults: {mamba2: {d_state: 8, head_dim: 16, chunk_size: 4}}
memory: {type: hmt, segment_len: 6, n_sensory: 2, recall_cache: 3}
"""


def test_recursive_ladder_mamba2_inside_hmt_from_one_yaml(tmp_path):
    from seqlm.memory import HMT
    from seqlm.train.optim import make_optimizer

    p = tmp_path / "c.yaml"
    p.write_text(YAML)
    cfg = load_config(p)
    torch.manual_seed(0)
    model = build_model(cfg, V)
    assert isinstance(model, HMT) and model.stack.ladder and len(model.stack.blocks) == 2
    plan = model.tp_plan()  # the registry-wide tp_plan check over the composed model
    for n, p in model.named_parameters():
        if p.dim() == 2 and n.startswith(("stack.", "memory.")):
            assert len([k for k in plan if re.fullmatch(k, n)]) == 1, n
    x = torch.randint(0, V, (2, 6 * 3 + 2))
    opt = make_optimizer(model, cfg.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():  # one step moves every parameter (LoRA A needs B != 0 first)
        if "lora_A" not in n:
            assert not torch.equal(p, before[n]), n
    model = model.double().eval()
    perturb_lora(model)
    with torch.no_grad():
        got, _ = model(x)
        # explicit segment loop (stage 1): [mem; sensory; segment; mem] through the stack
        L, k = 6, 2
        segs = model.embed(x).split(L, 1)
        mem, outs = model.memory.initial[None].expand(2, -1, -1), []
        for n, s in enumerate(segs):
            sens = segs[n - 1][:, L - k:] if n else s[:, :0]
            h = model.norm_f(model.stack(torch.cat([mem, sens, s, mem], 1))[0])
            outs.append(model.head(h[:, 1 + sens.shape[1]:1 + sens.shape[1] + s.shape[1]]))
            mem = h[:, -1:]
        torch.testing.assert_close(got, torch.cat(outs, 1), rtol=1e-9, atol=1e-10)
        st, stepped = model.init_state(2), []
        for t in range(x.shape[1]):
            y, st = model.step(x[:, t:t + 1], st)
            stepped.append(y)
    torch.testing.assert_close(torch.cat(stepped, 1), got, rtol=1e-8, atol=1e-10)


def test_lora_linear_factored_and_merged_agree_on_both_sides_of_the_threshold():
    """lora_linear applies the factors below N (in + out) < in out and merges above; both
    forms give the merged reference's outputs and gradients (fp32)."""
    from seqlm.recursive import factored_is_cheaper, lora_linear

    i, o, r = 64, 48, 4
    assert factored_is_cheaper(3, i, o) and not factored_is_cheaper(64, i, o)  # 3*112 < 3072 < 64*112
    torch.manual_seed(0)
    W, A, Bm = torch.randn(o, i), torch.randn(r, i), torch.randn(o, r)
    bias = torch.randn(o)
    for rows in (3, 64):
        ins = [t.clone().requires_grad_(True) for t in (torch.randn(rows, i), W, bias, A, Bm)]
        g = torch.randn(rows, o)
        out = lora_linear(*ins, scale=0.5)
        x, w, b, a, bm = ins
        ref = torch.nn.functional.linear(x, w + 0.5 * bm @ a, b)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad((out * g).sum(), ins), torch.autograd.grad((ref * g).sum(), ins)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 16])  # 1 x 3 tokens: factored Linears; 16 x 10: merged ones
def test_recursive_lora_dispatch_matches_merged(batch, monkeypatch):
    """A relaxed-recursive stack (Mamba-1 reads in_proj/dt_proj.weight directly) trains with
    the dispatched forms exactly as with every depth merged: same logits and gradients."""
    import seqlm.recursive as rec

    torch.manual_seed(0)
    cfg = parse_config({"model": {"d_model": 32, "pattern": "M*-", "n_layers": 6,
                                  "block_defaults": {"attention": {"n_heads": 2}},
                                  "recursive": {"groups": 3, "lora_rank": 4}}})
    model = LM(cfg.model, V)
    perturb_lora(model)
    x = torch.randint(0, V, (batch, 3 if batch == 1 else T))
    calls = {"factored": 0, "merged": 0}
    real = rec.factored_is_cheaper

    def counted(*a):
        f = real(*a)
        calls["factored" if f else "merged"] += 1
        return f

    monkeypatch.setattr(rec, "factored_is_cheaper", counted)
    out = model(x)[0]
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    monkeypatch.setattr(rec, "DISPATCH", False)  # every depth merged into its weight slot
    ref = model(x)[0]
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert calls["factored" if batch == 1 else "merged"] > 0
    assert batch == 1 or calls["factored"] == 0
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
