"""Activation checkpointing (train.activation_checkpointing): gradients identical to the plain
run for every block type and topology (ladder, recursive, HMT segments), with dropout and with
packed documents; fewer activations kept; the loop and dtype auto wiring."""
import pytest
import torch

from seqlm import registry
from seqlm.config import parse_config
from seqlm.io import build_model
from seqlm.train.precision import choose_cpu_dtype

V, T = 19, 20
NAMES = sorted(registry.blocks())
CHAR = {name: c for c, name in registry.pattern_chars().items()}
ALL = "".join(sorted(registry.pattern_chars()))


def make(pattern, dropout=0.0, memory=None, **model):
    m = {"d_model": 32, "pattern": pattern, "dropout": dropout,
         "block_defaults": {"attention": {"n_heads": 2}, "mamba": {"chunk_size": 8},
                            "mamba2": {"chunk_size": 8, "head_dim": 16}}, **model}
    cfg = parse_config({"model": m, **({"memory": memory} if memory else {})})
    torch.manual_seed(0)
    net = build_model(cfg, V)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    return net.train()


def grads(model, x, y, seq_idx=None, seed=5):
    torch.manual_seed(seed)  # dropout masks: the recompute must replay them
    model.zero_grad(set_to_none=True)
    loss = model.loss(x, y, seq_idx=seq_idx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(model, seq_idx=None, modes=(("layers", 1), ("every_k", 2), ("every_k", 3))):
    torch.manual_seed(1)
    x, y = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    model.set_activation_checkpointing("none")
    l0, g0 = grads(model, x, y, seq_idx)
    for mode, k in modes:
        model.set_activation_checkpointing(mode, k)
        l1, g1 = grads(model, x, y, seq_idx)
        assert torch.equal(l0, l1), (mode, k)
        assert g0.keys() == g1.keys()
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=f"{mode}/{k}: {n}")
    model.set_activation_checkpointing("none")


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_gradients_equal_plain(name):
    check_same(make(CHAR[name] + "-" if name != "mlp" else "--", dropout=0.1, n_layers=4))


@pytest.mark.parametrize("topology", ["ladder", "recursive", "hmt", "packed", "parallel"])
def test_checkpointed_gradients_topologies(topology):
    if topology == "ladder":
        check_same(make(ALL, residual="ladder", dropout=0.1))
    elif topology == "parallel":
        check_same(make(ALL + "-" * (len(ALL) % 2), parallel_residual=True, dropout=0.1))
    elif topology == "recursive":
        check_same(make(ALL, n_layers=2 * len(ALL), recursive={"groups": len(ALL), "lora_rank": 2}))
    elif topology == "hmt":
        check_same(make(ALL, memory={"segment_len": 6, "n_sensory": 2, "recall": True, "recall_cache": 2}))
    else:
        si = torch.tensor([[0] * 7 + [1] * 13, [0] * 15 + [1] * 2 + [2] * 3])
        check_same(make(ALL), seq_idx=si)


def saved_bytes(model, x, y):
    """Bytes of tensors autograd keeps for backward outside checkpointed regions."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, y)
    return total[0]


def test_checkpointing_keeps_fewer_activations():
    model = make("M2*-", n_layers=8)
    x, y = torch.randint(0, V, (2, 64)), torch.randint(0, V, (2, 64))
    plain = saved_bytes(model, x, y)
    model.set_activation_checkpointing("layers")
    per_layer = saved_bytes(model, x, y)
    model.set_activation_checkpointing("every_k", 4)
    runs = saved_bytes(model, x, y)
    assert per_layer < plain / 3 and runs < per_layer
    with torch.no_grad():  # no gradients: nothing to recompute, plain forward
        model.set_activation_checkpointing("layers")
        torch.testing.assert_close(model(x)[0], (model.set_activation_checkpointing("none") or model)(x)[0])


def test_checkpointing_mode_validates():
    model = make("*-")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        model.set_activation_checkpointing("all")
    with pytest.raises(ValueError, match="activation_checkpoint_k"):
        model.set_activation_checkpointing("every_k", 0)


def test_dtype_auto_decision():
    assert choose_cpu_dtype(512, 1024, flags=[])[0] is None
    dt, why = choose_cpu_dtype(512, 1024, flags=["amx_bf16"], probe=lambda d, n: 3.0)
    assert dt is torch.bfloat16 and "amx_bf16" in why and "3.0x" in why
    dt, why = choose_cpu_dtype(32, 1024, flags=["avx512_bf16"], probe=lambda d, n: 0.9)
    assert dt is None and "fp32" in why


def test_train_loop_with_checkpointing_matches_plain(tmp_path, capsys):
    """The loop wires train.activation_checkpointing; the losses equal the plain run's, and
    dtype auto prints its choice."""
    import json

    from seqlm.train.loop import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: a quick brown fox.\n" for i in range(200)))

    def run(out, **t):
        cfg = parse_config({
            "model": {"d_model": 32, "pattern": "2*-", "n_layers": 3, "dropout": 0.1,
                      "block_defaults": {"attention": {"n_heads": 2}}},
            "data": {"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
            "train": {"seq_len": 16, "batch_size": 2, "max_steps": 3, "warmup_steps": 1, "dtype": "fp32",
                      "out_dir": str(tmp_path / out), "log_every": 1, "progress": False, **t},
            "eval": {"every": 0, "batches": 1, "sample_tokens": 0}})
        train(cfg)
        recs = [json.loads(ln) for ln in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]

    plain = run("a")
    ck = run("b", activation_checkpointing="every_k", activation_checkpoint_k=2)
    assert len(plain) == 3 and plain == pytest.approx(ck, rel=1e-6, abs=1e-6)
    run("c", max_steps=1, dtype="auto")
    assert "train.dtype auto ->" in capsys.readouterr().out


def test_train_loop_document_packing_reaches_the_model(tmp_path, monkeypatch):
    """data.packing: document -> the loop passes each batch's seq_idx to model.loss (training
    and validation), with checkpointing on."""
    from seqlm.model import LM
    from seqlm.train.loop import train

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join('{"text": "doc %d: %s"}\n' % (i, "a quick brown fox " * (1 + i % 5)) for i in range(120)))
    seen = []
    orig = LM.loss

    def spy(self, x, y, ignore_index=-100, seq_idx=None):
        seen.append(seq_idx)
        return orig(self, x, y, ignore_index, seq_idx=seq_idx)

    monkeypatch.setattr(LM, "loss", spy)
    cfg = parse_config({
        "model": {"d_model": 32, "pattern": "2*-", "block_defaults": {"attention": {"n_heads": 2}}},
        "data": {"files": [str(docs)], "cache_dir": str(tmp_path / "cache"), "packing": "document"},
        "train": {"seq_len": 64, "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "dtype": "fp32",
                  "activation_checkpointing": "layers", "out_dir": str(tmp_path / "run"), "progress": False},
        "eval": {"every": 0, "batches": 1, "sample_tokens": 0}})
    res = train(cfg)
    assert seen and all(s is not None and s.shape == (2, 64) for s in seen)
    assert any(int(s[:, -1].max()) > 0 for s in seen)  # windows really span documents
    assert res["val_loss"] == res["val_loss"]
