"""HMT wrapper: the segment recurrence against a hand-written loop, streaming == stateless,
bounded memory, truncated BPTT, stage 2 from stage 1, generation over many segments, training."""
import json
import re
from pathlib import Path

import pytest
import torch

from seqlm import registry
from seqlm.config import ConfigError, dump_config, load_config, parse_config
from seqlm.data.tokenizers import CharTokenizer
from seqlm.io import (CheckpointError, build_model, init_from_checkpoint, load_model, maybe_init_from,
                      save_checkpoint)
from seqlm.memory import HMT, recall_ref
from seqlm.model import LM

V = 20
MIXERS = [n for n in sorted(registry.blocks()) if n != "mlp"]  # attention + every SSM block
CHAR = {name: c for c, name in registry.pattern_chars().items()}


def cfg_dict(mixer="attention", **mem):
    m = {"segment_len": 8, "n_sensory": 3, "recall_cache": 3}
    m.update(mem)
    return {"model": {"d_model": 32, "pattern": CHAR[mixer] + "-", "n_layers": 4,
                      "block_defaults": {"attention": {"n_heads": 2}}}, "memory": m}


def make(mixer="attention", dtype=torch.float64, seed=0, **mem):
    torch.manual_seed(seed)
    model = build_model(parse_config(cfg_dict(mixer, **mem)), V).to(dtype).eval()
    with torch.no_grad():  # non-trivial memory parameters
        for p in model.memory.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 2 and p.shape[0] == p.shape[1] else 1.0)
    return model


def explicit_loop(model, tokens):
    """Hand-written HMT recurrence (always appends the trailing memory, uses recall_ref)."""
    L, k, nm, mc = model.mcfg.segment_len, model.mcfg.n_sensory, model.mcfg.n_memory, model.mcfg
    qlen = mc.query_len or L // 2
    segs = model.embed(tokens).split(L, dim=1)
    mems, logits = [], []
    for n, x in enumerate(segs):
        B = x.shape[0]
        if n == 0:
            mem = model.memory.initial[None].expand(B, -1, -1)
        elif not mc.recall:
            mem = mems[-1]
        else:
            rt = model.memory.recall_token[None].expand(B, -1, -1)
            q_src = segs[n - 1][:, -qlen:] if mc.query_source == "previous" else x[:, :qlen]
            q = model.norm_f(model.stack(torch.cat([rt, q_src, rt], 1))[0])[:, -nm:]
            mem = recall_ref(model.memory, q, torch.stack(mems[-mc.recall_cache:], 1))
        sens = segs[n - 1][:, L - k:] if n > 0 else x[:, :0]
        h = model.norm_f(model.stack(torch.cat([mem, sens, x, mem], 1))[0])
        a = nm + sens.shape[1]
        logits.append(model.head(h[:, a:a + x.shape[1]]))
        mems.append(h[:, -nm:])
    return torch.cat(logits, 1)


def test_config_section_validates_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match=r"memory\.n_sensory: 9 exceeds segment_len=8"):
        parse_config({"memory": {"segment_len": 8, "n_sensory": 9}})
    with pytest.raises(ConfigError, match=r"memory\.query_source"):
        parse_config({"memory": {"query_source": "future"}})
    with pytest.raises(ConfigError, match=r"memory\.bptt_depth"):
        parse_config({"memory": {"bptt_depth": 0}})
    cfg = parse_config(cfg_dict(recall=True, bptt_depth=2))
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg and isinstance(build_model(cfg, V), HMT)
    assert type(build_model(parse_config({"model": cfg_dict()["model"]}), V)) is LM


def test_recall_matches_reference():
    model = make(recall=True, n_memory=2, recall_dim=16)
    q, cache = torch.randn(3, 2, 32, dtype=torch.float64), torch.randn(3, 5, 2, 32, dtype=torch.float64)
    torch.testing.assert_close(model.memory.recall(q, cache), recall_ref(model.memory, q, cache))


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("mem", [dict(), dict(recall=True), dict(recall=True, n_memory=2, n_sensory=0),
                                 dict(recall=True, query_source="segment", query_len=3)])
def test_segments_equal_explicit_loop(mixer, mem):
    model = make(mixer, **mem)
    x = torch.randint(0, V, (2, 8 * 5 + 3))  # 5 full segments + a partial one
    with torch.no_grad():
        got, state = model(x)
        ref = explicit_loop(model, x)
    assert state is None and got.shape == (2, 43, V)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-8)
    # the memory matters: a different initial memory changes every segment's logits (fp64; the
    # influence decays through SSM states, e.g. to ~1e-8 for Mamba-1, far above roundoff ~1e-16)
    with torch.no_grad():
        model.memory.initial.add_(1.0)
        other, _ = model(x)
    assert (other - got).abs().amax(dim=(0, 2)).min() > 1e-12


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("mem", [dict(), dict(recall=True)])
def test_streaming_equals_stateless(mixer, mem):
    model = make(mixer, **mem)
    x = torch.randint(0, V, (2, 45))
    with torch.no_grad():
        ref, _ = model(x)
        st, outs, i = model.init_state(2), [], 0
        for c in (1, 5, 8, 3, 1, 1, 11, 15):  # chunks straddle segment boundaries
            y, st = model(x[:, i:i + c], st)
            outs.append(y)
            i += c
        assert i == 45 and st["seg"] == 5 and st["pos"] == 5
        steps = model.init_state(2)
        stepped = torch.cat([model.step(x[:, t:t + 1], steps)[0] for t in range(45)], 1)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(stepped, ref, rtol=1e-9, atol=1e-10)


def _state_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


@pytest.mark.parametrize("recall", [False, True])
def test_memory_is_bounded_by_the_segment(recall):
    model = make(recall=recall, dtype=torch.float32)
    seen = []
    hook = model.stack.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    stats = {}
    for n_tokens in (96, 384):  # 12 and 48 segments: 4x longer input
        seen.clear()
        x = torch.randint(0, V, (1, n_tokens))
        with torch.no_grad():
            st = model.init_state(1, n_tokens)
            for i in range(0, n_tokens, 10):
                _, st = model(x[:, i:i + 10], st)
            model(x)  # the stateless path too
        stats[n_tokens] = (max(seen), _state_bytes(st), 0 if st["cache"] is None else st["cache"].shape[1])
    hook.remove()
    assert stats[96] == stats[384], stats  # flat: nothing grows with the input
    assert stats[384][0] == model.backbone_window == 8 + 3 + 2  # L + n_sensory + 2 * n_memory
    assert stats[384][2] == (3 if recall else 0)  # the cache holds recall_cache memories
    lm_seen = []
    plain = LM(model.cfg, V)
    plain.stack.register_forward_pre_hook(lambda mod, args: lm_seen.append(args[0].shape[1]))
    with torch.no_grad():
        plain(torch.randint(0, V, (1, 384)))
    assert max(lm_seen) == 384  # the measure does see whole-input processing


@pytest.mark.parametrize("mem", [dict(), dict(recall=True), dict(n_sensory=0)])
@pytest.mark.parametrize("depth", [1, 2, 3, None])
def test_detach_beyond_bptt_depth(mem, depth):
    model = make(bptt_depth=depth, **mem)
    S, L = 6, 8
    x = torch.randint(0, V, (2, S * L))
    emb = model.embed(x).detach().requires_grad_(True)
    h, _ = model.hidden_from_embeddings(emb)
    model.head(h[:, -L:]).pow(2).sum().backward()  # the loss of the last segment only
    per_seg = emb.grad.abs().view(2, S, L, -1).sum(dim=(0, 2, 3))  # (S,)
    reach = S if depth is None else depth  # segments the last segment's loss reaches
    assert torch.all(per_seg[:S - reach] == 0), (depth, per_seg)
    assert torch.all(per_seg[S - reach:] > 0), (depth, per_seg)


def _ckpt(tmp_path, name, model, cfg_d):
    tok = CharTokenizer([chr(97 + i) for i in range(V - 1)])
    return save_checkpoint(tmp_path / name, model, parse_config(cfg_d), tok)


def test_stage2_loads_stage1(tmp_path, capsys):
    s1 = make(dtype=torch.float32, seed=1)
    path = _ckpt(tmp_path, "s1", s1, cfg_dict())
    s2 = make(dtype=torch.float32, seed=2, recall=True)
    fresh = {k: v.clone() for k, v in s2.state_dict().items()}
    new = init_from_checkpoint(s2, path)
    recall_names = ["memory.recall_token", "memory.w_k.weight", "memory.w_q.weight"]
    assert new == recall_names
    assert "newly initialised: " + ", ".join(recall_names) in capsys.readouterr().out
    sd1, sd2 = s1.state_dict(), s2.state_dict()
    for k, v in sd2.items():
        if k in recall_names:
            assert torch.equal(v, fresh[k]), k  # kept its fresh initialisation
        else:
            assert torch.equal(v, sd1[k]), k  # loaded from stage 1
    # the training-loop hook reads memory.init_from
    s2b = make(dtype=torch.float32, seed=3, recall=True)
    assert maybe_init_from(s2b, parse_config(cfg_dict(recall=True, init_from=str(path)))) == recall_names
    assert torch.equal(s2b.memory.initial, s1.memory.initial)
    # a stage-2 checkpoint does not silently load into stage 1; a plain LM loads into HMT
    p2 = _ckpt(tmp_path, "s2", s2, cfg_dict(recall=True))
    with pytest.raises(CheckpointError, match=r"no place for: \['memory.recall_token'"):
        init_from_checkpoint(make(dtype=torch.float32), p2)
    lm_d = {"model": cfg_dict()["model"]}
    p_lm = _ckpt(tmp_path, "lm", LM(parse_config(lm_d).model, V), lm_d)
    assert init_from_checkpoint(make(dtype=torch.float32, recall=True), p_lm) == ["memory.initial"] + recall_names
    with pytest.raises(CheckpointError, match="no checkpoint"):
        init_from_checkpoint(s2, tmp_path / "nowhere")


def test_checkpoint_round_trip(tmp_path):
    model = make(dtype=torch.float32, recall=True)
    path = _ckpt(tmp_path, "c", model, cfg_dict(recall=True))
    loaded, cfg, _ = load_model(path)
    assert isinstance(loaded, HMT) and cfg.memory.recall
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


@pytest.mark.parametrize("mem", [dict(), dict(recall=True)])
def test_generate_over_many_segments(mem):
    model = make(**mem)
    prompt = torch.randint(0, V, (2, 8 * 5 + 2))  # 5 segments and a bit
    gen = model.generate(prompt, 30, temperature=0.0)  # rolls over 4 more segment boundaries
    assert gen.shape == (2, 30)
    full = torch.cat([prompt, gen], 1)
    with torch.no_grad():
        logits, _ = model(full)
    # greedy tokens are the argmax of the stateless forward over prompt + generated tokens
    assert torch.equal(logits[:, prompt.shape[1] - 1:-1].argmax(-1), gen)
    sampled = model.generate(prompt[0], 12, temperature=1.0, top_k=5, seed=3)
    assert sampled.shape == (12,) and torch.equal(sampled, model.generate(prompt[0], 12, 1.0, 5, seed=3))


def test_segment_query_source_is_rejected_for_streaming():
    model = make(recall=True, query_source="segment", query_len=3)
    with pytest.raises(ValueError, match="query_source.*not causal"):
        model.generate(torch.randint(0, V, (1, 20)), 4, temperature=0.0)


def test_param_counts_and_tp_plan():
    model = make(recall=True, recall_dim=16, dtype=torch.float32)
    c = model.param_counts()
    assert c["hmt"] == 32 + 32 + 2 * 32 * 16 and c["backbone"] + c["hmt"] == model.num_params()
    assert c["backbone"] == LM(model.cfg, V).num_params()
    assert abs(c["hmt_pct_of_backbone"] - 100 * c["hmt"] / c["backbone"]) < 1e-9
    plan = model.tp_plan()
    assert {k: v for k, v in LM(model.cfg, V).tp_plan().items()}.items() <= plan.items()
    for name, p in model.memory.named_parameters(prefix="memory"):  # every HMT weight, once
        assert [plan[k] for k in plan if re.fullmatch(k, name)] == ["replicate"], name


def test_two_stage_training_from_yaml(tmp_path, capsys):
    """Stage 1 trains; stage 2 (recall on, memory.init_from in the YAML) starts from its weights
    and tokenizer: its first loss is stage 1's trained loss, not a fresh model's."""
    from seqlm.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i % 7} the quick brown fox jumps over the lazy dog.\n" for i in range(300)))

    def run(name, steps, **mem):
        d = cfg_dict(**mem)
        d.update(data={"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
                 train={"seq_len": 32, "batch_size": 4, "max_steps": steps, "lr": 5e-3, "warmup_steps": 2,
                        "out_dir": str(tmp_path / name), "log_every": 1, "progress": False},
                 eval={"every": 0, "batches": 2, "sample_tokens": 20})
        p = tmp_path / f"{name}.yaml"
        p.write_text(dump_config(parse_config(d)))
        res = train(load_config(p))
        recs = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return res, [r["loss"] for r in recs if r["kind"] == "train"]

    res1, l1 = run("s1", 30)
    out1 = capsys.readouterr().out
    assert len(l1) == 30 and sum(l1[-5:]) / 5 < sum(l1[:5]) / 5 - 0.5
    assert re.search(r"HMT: backbone [\d,]+ params \+ memory 32 \(0\.\d+% extra\)", out1), out1
    assert len(res1["sample"]) > 0  # generation through the training loop's sample
    res2, l2 = run("s2", 3, recall=True, init_from=res1["checkpoint"])
    out2 = capsys.readouterr().out
    assert "newly initialised: memory.recall_token, memory.w_k.weight, memory.w_q.weight" in out2
    assert l2[0] < l1[0] - 0.5 and abs(l2[0] - sum(l1[-5:]) / 5) < 0.5, (l1, l2)
    loaded, cfg, _ = load_model(res2["checkpoint"])
    assert isinstance(loaded, HMT) and cfg.memory.recall and cfg.memory.segment_len == 8
    with pytest.raises(CheckpointError, match="memory.init_from: no checkpoint"):
        run("s3", 1, recall=True, init_from=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("recall", [False, True])
def test_eval_ppl_and_generate_cli_on_hmt_checkpoint(tmp_path, capsys, recall):
    """`seqlm eval ppl` over an input many segments long (one window, run chunk by chunk through
    the streaming path) equals the stateless forward's NLL; `seqlm generate` runs an HMT checkpoint."""
    import math

    import torch.nn.functional as F

    from seqlm.cli import main

    model = make(dtype=torch.float32, seed=4, recall=recall)
    ck = str(_ckpt(tmp_path, "c", model, cfg_dict(recall=recall)))
    g = torch.Generator().manual_seed(0)
    text = "".join(chr(97 + i) for i in torch.randint(0, V - 1, (150,), generator=g).tolist())
    data = tmp_path / "long.txt"
    data.write_text(text)
    ids = torch.tensor([[V - 1] + [ord(c) - 97 for c in text]])  # EOS first: every char is a target
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
        want = F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="sum").item() / 150
    for chunk in ("16", "4096"):  # streaming (150 > 16: state carried across 19 segments) / stateless
        out = tmp_path / f"ev{chunk}"
        assert main(["eval", "ppl", "--checkpoint", ck, "--data", str(data), "--context", "full",
                     "--chunk", chunk, "--out", str(out), "--quiet"]) == 0
        res = json.loads((out / "ppl.json").read_text())
        r = res["contexts"]["full"]
        assert res["unbounded_model"] and r["n_tokens"] == 150
        assert r["loss"] == pytest.approx(want, rel=1e-5), chunk
        assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-4)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", ck, "--prompt", text[:45], "--max-new-tokens", "20",
                 "--temperature", "0", "--quiet"]) == 0
    got = capsys.readouterr().out.rstrip("\n")
    new = model.generate(ids[0, 1:46], 20, temperature=0.0)  # crosses two segment boundaries
    assert got == "".join(chr(97 + i) if i < V - 1 else "" for i in new.tolist()) and len(got) > 0
