"""Hugging Face interop (seqlm/io/hf): tiny random transformers models built locally for every
supported architecture; nothing reaches a hub (HF_HUB_OFFLINE=1, tests/conftest.py).

Per architecture: seqlm's logits equal transformers' (fp32, max abs diff <= 1e-4); greedy
generation with caches gives the same 16 tokens; ``seqlm eval ppl`` on the HF directory equals
transformers' loss; HF -> seqlm -> HF gives back every tensor exactly and transformers loads the
export; seqlm -> HF -> seqlm is exact too."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_fixtures import ARCHS, TEXT, build_hf, build_tokenizer  # noqa: E402

from seqlm.io.hf import export_hf, export_state, to_seqlm_state  # noqa: E402
from seqlm.io.hf.common import read_weights  # noqa: E402
from seqlm.io.pretrained import load_any  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(arch):
        if arch not in cache:
            d = root / arch
            cache[arch] = (d, build_hf(arch, d, tokenizer))
        return cache[arch]

    return get


def _ids(n=24, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (batch, n), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_generation_match_transformers(arch, hf_dirs):
    d, hf = hf_dirs(arch)
    model, cfg, tok = load_any(d)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    prompt = ids[:1, :8]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)[0, 8:]
    got = model.generate(prompt[0], 16, temperature=0.0)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "mamba", "mamba2", "nemotron_h"])
def test_eval_ppl_on_hf_dir_equals_transformers_loss(arch, hf_dirs, tmp_path):
    from seqlm.cli import main

    d, hf = hf_dirs(arch)
    text = TEXT[:150]
    (tmp_path / "t.txt").write_text(text)
    rc = main(["eval", "ppl", "--checkpoint", str(d), "--data", str(tmp_path / "t.txt"), "--context", "full",
               "--quiet", "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "ppl.json").read_text())
    ours = res["contexts"]["full"]["loss"]
    _, _, tok = load_any(d)
    ids = torch.tensor([[tok.eos_id] + tok.encode(text)])
    with torch.no_grad():
        ref = hf(ids, labels=ids).loss.item()
    assert abs(ours - ref) <= 1e-4, (ours, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_hf_seqlm_hf_is_exact(arch, hf_dirs, tmp_path):
    import transformers

    d, hf = hf_dirs(arch)
    model, cfg, tok = load_any(d)
    hc, sd = export_state(model, cfg, model.vocab_size, tok.eos_id)
    ref = read_weights(d)  # the tensors transformers saved
    assert sorted(sd) == sorted(ref)
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k
    out = export_hf(model, cfg, tok, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is type(hf)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    assert fast(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)


SEQLM_MODELS = {
    "llama": {"d_model": 32, "pattern": "*-", "n_layers": 4,
              "block_defaults": {"attention": {"n_heads": 4, "n_kv_heads": 2}, "mlp": {"kind": "swiglu"}}},
    "mistral": {"d_model": 32, "pattern": "*-", "tie_embeddings": False,
                "block_defaults": {"attention": {"n_heads": 2, "window": 5}, "mlp": {"kind": "swiglu"}}},
    "gpt2": {"d_model": 32, "pattern": "*-", "norm": "layernorm", "pos_embedding": "learned", "max_positions": 40,
             "block_defaults": {"attention": {"rope": False, "bias": True}, "mlp": {"kind": "gelu_tanh", "bias": True}}},
    "gpt_neox": {"d_model": 32, "pattern": "*-", "norm": "layernorm", "parallel_residual": True, "tie_embeddings": False,
                 "block_defaults": {"attention": {"n_heads": 2, "rotary_dim": 4, "bias": True},
                                    "mlp": {"kind": "gelu", "bias": True}}},
    "mamba": {"d_model": 32, "pattern": "M", "n_layers": 2, "block_defaults": {"mamba": {"d_state": 4}}},
    "mamba2": {"d_model": 32, "pattern": "2", "n_layers": 2,
               "block_defaults": {"mamba2": {"d_state": 8, "head_dim": 8, "ngroups": 2, "chunk_size": 8}}},
    "nemotron_h": {"d_model": 32, "pattern": "2-*-",
                   "block_defaults": {"mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 8, "dt_floor": 1e-4},
                                      "attention": {"n_heads": 4, "rope": False}, "mlp": {"kind": "relu2"}}},
}


@pytest.mark.parametrize("kind", sorted(SEQLM_MODELS))
def test_round_trip_seqlm_hf_seqlm_is_exact(kind, tokenizer, tmp_path):
    import transformers

    from seqlm.config import parse_config
    from seqlm.data.hf_tokenizer import HFTokenizer
    from seqlm.io.factory import build_model

    torch.manual_seed(3)
    cfg = parse_config({"model": SEQLM_MODELS[kind]})
    tok = HFTokenizer(tokenizer.to_str().encode(), "<|endoftext|>")
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    out = export_hf(model, cfg, tok, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
    _, mcfg, sd = to_seqlm_state(out)
    mine = model.state_dict()
    assert sorted(sd) == sorted(mine)
    for k in sd:
        assert torch.equal(sd[k], mine[k]), k
    back, cfg2, tok2 = load_any(out)
    assert [s.type for s in cfg2.model.layers] == [s.type for s in cfg.model.layers] and tok2 == tok
    ids = _ids(n=20)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = back(ids)
        assert torch.equal(a, b)
        assert (hf(ids).logits - a).abs().max().item() <= 1e-4


UNSUPPORTED = [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
     "rope_parameters.rope_type: 'yarn' is not supported"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None},
     "rope_scaling.rope_type: 'linear' is not supported"),
    ("llama", {"hidden_act": "gelu_fast"}, "hidden_act: activation 'gelu_fast' is not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx: True is not supported"),
    ("gpt2", {"activation_function": "quick_gelu"}, "activation_function: activation 'quick_gelu'"),
    ("nemotron_h", {"layers_block_type": ["mamba", "moe", "attention", "mlp", "mamba"]},
     "layers_block_type[1]: 'moe' is not supported"),
    ("mamba2", {"rms_norm": False}, "rms_norm: false (no gated norm) is not supported"),
    ("llama", {"model_type": "t5"}, "model_type: 't5' is not supported"),
]


@pytest.mark.parametrize("arch,patch,msg", UNSUPPORTED)
def test_unsupported_configs_are_refused(arch, patch, msg, hf_dirs, tmp_path, capsys):
    import shutil

    from seqlm.cli import main
    from seqlm.io.checkpoint import CheckpointError

    d, _ = hf_dirs(arch)
    capsys.readouterr()  # building the fixture prints transformers' progress bars
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    hc = json.loads((bad / "config.json").read_text())
    hc.update(patch)
    (bad / "config.json").write_text(json.dumps(hc))
    with pytest.raises(CheckpointError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_any(bad)
    assert main(["convert", "from-hf", "--src", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "config.json" in err[0]
    assert not (tmp_path / "o").exists()


def test_export_refuses_stacks_without_an_hf_equivalent(tmp_path, tokenizer):
    from seqlm.config import parse_config
    from seqlm.data.hf_tokenizer import HFTokenizer
    from seqlm.io.factory import build_model
    from seqlm.io.hf import UnsupportedHF

    tok = HFTokenizer(tokenizer.to_str().encode(), "<|endoftext|>")
    cases = [({"model": {"d_model": 32, "pattern": "*-", "residual": "ladder"}}, "model.residual: 'ladder'"),
             ({"model": {"d_model": 32, "pattern": "*-", "n_layers": 4, "recursive": {"groups": 2}}}, "model.recursive"),
             ({"model": {"d_model": 32, "pattern": "H-"}}, "model.layers: no transformers architecture holds ['h3']"),
             ({"model": {"d_model": 32, "pattern": "*-"}, "memory": {"segment_len": 8, "n_sensory": 2}}, "memory: HMT"),
             ({"model": {"d_model": 32, "pattern": "2*-", "block_defaults": {"mamba2": {"head_dim": 8}}}},
              "Nemotron-H attention has no RoPE"),
             ({"model": {"d_model": 32, "pattern": "*-"}}, "model.layers[1].kind: Llama uses swiglu")]
    for data, msg in cases:
        cfg = parse_config(data)
        model = build_model(cfg, tok.vocab_size)
        with pytest.raises(UnsupportedHF, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            export_hf(model, cfg, tok, tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_cli_convert_both_ways_and_checkpoint_paths(hf_dirs, tmp_path, capsys):
    """from-hf writes a seqlm model directory (with a model card) that generate reads; to-hf
    writes a directory transformers loads; generate also takes the HF directory itself."""
    import transformers

    from seqlm.cli import main

    d, hf = hf_dirs("llama")
    assert main(["convert", "from-hf", "--src", str(d), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "README.md").read_text().count("```yaml") == 1
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "s"), "--out", str(tmp_path / "h")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "h"))
    for k, v in hf.state_dict().items():
        if not k.endswith("inv_freq"):
            assert torch.equal(back.state_dict()[k], v), k
    capsys.readouterr()
    outs = []
    for ckpt in (d, tmp_path / "s"):
        assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "The quick", "--max-new-tokens", "6",
                     "--temperature", "0", "--device", "cpu"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("The quick")


def test_seqlm_load_and_pretrained_dir(hf_dirs, tmp_path):
    import seqlm
    from seqlm.model import LM

    d, hf = hf_dirs("mamba2")
    model, tok = seqlm.load(d)
    assert isinstance(model, LM) and tok.type == "hf"
    model.save_pretrained(tmp_path / "p", tokenizer=tok, metrics={"val_loss": 1.25})
    card = (tmp_path / "p" / "README.md").read_text()
    assert "val_loss" in card and "mamba2" in card
    again = LM.from_pretrained(tmp_path / "p")
    m2, tok2 = seqlm.load(tmp_path / "p", dtype="fp64")
    assert tok2 == tok and next(m2.parameters()).dtype == torch.float64
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], again(ids)[0])
        assert (m2(ids)[0].float() - model(ids)[0]).abs().max().item() < 1e-4


def test_tokenizer_ids_identical_to_transformers(hf_dirs, tmp_path):
    import transformers

    from seqlm.data.tokenizers import load_tokenizer

    d, _ = hf_dirs("gpt2")
    _, _, tok = load_any(d)
    fast = transformers.AutoTokenizer.from_pretrained(str(d))
    text = TEXT + "<|endoftext|>héllo 😀 world\n\n  spaces"
    assert tok.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_id == fast.convert_tokens_to_ids("<|endoftext|>")
    assert "<|endoftext|>" not in tok.decode(tok.encode(text)) and tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again == tok and again.encode(text) == tok.encode(text)


def test_bin_weights_are_read_with_weights_only(hf_dirs, tmp_path):
    """A directory with pytorch_model.bin (no safetensors) loads; a pickle that is not plain
    tensors is refused, never executed."""
    import pickle
    import shutil

    d, hf = hf_dirs("gpt2")
    b = tmp_path / "bin"
    shutil.copytree(d, b)
    (b / "model.safetensors").unlink()
    torch.save(hf.state_dict(), b / "pytorch_model.bin")
    model, _, _ = load_any(b)
    ids = _ids()
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (b / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    from seqlm.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a plain tensor file"):
        load_any(b)
    assert not (tmp_path / "pwned").exists()


def test_lm_eval_adapter_takes_an_hf_dir(hf_dirs):
    """lm-eval's seqlm model reads a Hugging Face directory: its loglikelihood equals the one
    computed from transformers' own logits; the window comes from max_position_embeddings."""
    pytest.importorskip("lm_eval")
    import torch.nn.functional as F

    from seqlm.eval.lm_eval_adapter import SeqLMEval

    d, hf = hf_dirs("gpt_neox")
    lm = SeqLMEval(checkpoint=str(d), device="cpu")
    assert lm.max_length == hf.config.max_position_embeddings

    class Req:
        def __init__(self, *args):
            self.args = args

    (score, _), = lm.loglikelihood([Req("The quick brown", " fox jumps")], disable_tqdm=True)
    c, x = lm.tok.encode("The quick brown"), lm.tok.encode(" fox jumps")
    with torch.no_grad():
        lp = F.log_softmax(hf(torch.tensor([c + x[:-1]])).logits[0], -1)[-len(x):]
    want = float(lp.gather(-1, torch.tensor(x)[:, None]).sum())
    assert score == pytest.approx(want, abs=1e-4)


def test_sentencepiece_hf_dir_and_training_tokenizer_config(hf_dirs, tmp_path):
    """A directory with tokenizer.model (SentencePiece) instead of tokenizer.json loads with the
    same ids as sentencepiece; `data.tokenizer: {type: hf, path: DIR}` builds the HF tokenizer."""
    import shutil

    import sentencepiece as spm

    from seqlm.config import parse_config
    from seqlm.data.tokenizers import build_tokenizer as build_seqlm_tokenizer
    from seqlm.data.tokenizers import train_sentencepiece

    d, hf = hf_dirs("llama")
    (tmp_path / "corpus.txt").write_text(TEXT * 3)
    train_sentencepiece([str(tmp_path / "corpus.txt")], 80, "bpe", tmp_path / "sp.model", byte_fallback=False)
    s = tmp_path / "spdir"
    shutil.copytree(d, s)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (s / f).unlink()
    shutil.copy(tmp_path / "sp.model", s / "tokenizer.model")
    _, _, tok = load_any(s)
    sp = spm.SentencePieceProcessor(model_file=str(s / "tokenizer.model"))
    assert tok.type == "sentencepiece" and tok.encode(TEXT) == sp.encode(TEXT)

    cfg = parse_config({"model": {"pattern": "*-"}, "data": {"tokenizer": {"type": "hf", "path": str(d)}}})
    t2 = build_seqlm_tokenizer(cfg.data.tokenizer, [])
    assert t2.type == "hf" and t2 == load_any(d)[2]


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_char_and_byte_tokenizers_export_with_the_same_ids(kind, tmp_path):
    """to-hf writes a tokenizer.json for seqlm's char and byte tokenizers: transformers' fast
    tokenizer gives the same ids, and importing the export gives the same tokenizer ids back."""
    import transformers

    from seqlm.config import parse_config
    from seqlm.data.tokenizers import ByteTokenizer, CharTokenizer
    from seqlm.io.factory import build_model

    text = "Hello, world!\n  é 😀 tabs\tand\nlines"
    tok = CharTokenizer.fit([text]) if kind == "char" else ByteTokenizer()
    cfg = parse_config({"model": {"d_model": 16, "pattern": "2", "block_defaults": {"mamba2": {"head_dim": 8}}}})
    model = build_model(cfg, tok.vocab_size)
    out = export_hf(model, cfg, tok, tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(str(out))
    assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert fast.convert_tokens_to_ids("<|endoftext|>") == tok.eos_id
    assert fast.decode(tok.encode(text)) == text
    _, _, back = load_any(out)
    assert back.encode(text) == tok.encode(text) and back.eos_id == tok.eos_id
