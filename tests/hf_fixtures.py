"""Tiny random transformers models and a small tokenizer, built locally (nothing from a hub)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. Long sequences need linear-time layers; "
        "state space models carry a fixed-size state.\n") * 4
EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "hello world\n", "seqlm converts models"], trainer)
    return tok


def save_tokenizer(tok, d: Path) -> None:
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": EOS, "bos_token": EOS}))


V = 320  # model vocab (>= the tokenizer's ~300 ids)


def _cfgs():
    import transformers as T

    common = dict(vocab_size=V, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.15)
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_theta=5000.0, tie_word_embeddings=False, **common)),
        "llama_tied_bias": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
            attention_bias=True, mlp_bias=True, tie_word_embeddings=True, **common)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            sliding_window=8, **common)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **common)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            rotary_pct=0.5, hidden_dropout=0, attention_dropout=0, **common)),
        "gpt_neox_seq": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, use_parallel_residual=False,
            hidden_dropout=0, attention_dropout=0, **common)),
        "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(
            hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, **common)),
        "mamba2": lambda: T.Mamba2ForCausalLM(T.Mamba2Config(
            hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=8, head_dim=8, n_groups=2,
            chunk_size=16, **common)),
        "nemotron_h": lambda: T.NemotronHForCausalLM(T.NemotronHConfig(
            hidden_size=32, layers_block_type=["mamba", "mlp", "attention", "mlp", "mamba"], num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=8,
            mamba_head_dim=8, n_groups=2, chunk_size=16, time_step_min=1e-3, **common)),
    }


ARCHS = ["llama", "llama_tied_bias", "mistral", "gpt2", "gpt_neox", "gpt_neox_seq", "mamba", "mamba2", "nemotron_h"]


def build_hf(arch: str, out: Path, tokenizer=None, seed: int = 0):
    """A tiny random transformers model of ``arch`` saved (safetensors) with a tokenizer in ``out``."""
    torch.manual_seed(seed)
    model = _cfgs()[arch]().eval()
    with torch.no_grad():  # make every parameter matter (norm weights / biases default to 1 / 0)
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "layernorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight",
                           "final_layer_norm.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith(".bias") and "conv1d" not in n and "dt_proj" not in n:
                p.add_(0.05 * torch.randn_like(p))
            elif n.endswith("dt_bias"):  # dt well above time_step_min (see seqlm/io/hf/nemotron_h.py)
                p.copy_(torch.empty_like(p).uniform_(-3.0, -1.0))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer or build_tokenizer(), out)
    return model
