"""Language model: embedding -> stack -> final norm -> head; per-layer caches; generate()."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from seqlm.config import ModelConfig
from seqlm.model_card import load_pretrained_dir, save_pretrained_dir
from seqlm.ops.docs import check_seq_idx, doc_starts
from seqlm.ops.norm import make_norm
from seqlm.stack import Stack


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: Optional[int] = None):
        super().__init__()
        V = cfg.vocab_size or vocab_size
        if not V:
            raise ValueError("model.vocab_size: unknown; set it or build the model from a tokenizer")
        if cfg.vocab_size and vocab_size and cfg.vocab_size < vocab_size:
            raise ValueError(f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
        self.cfg, self.vocab_size = cfg, V
        self.embed = nn.Embedding(V, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # learned absolute positions (GPT-2); the state then carries the position (PosState)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.pos_embedding == "learned" else None
        self.stack = Stack(cfg)
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, V, bias=False)
        nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, 0.0, cfg.init_std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, 0.0, cfg.init_std)

    # -- forward ----------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, state=None, seq_idx=None):
        """tokens (B, T) -> final-normed hidden states (B, T, D) and the new state.
        ``seq_idx`` (B, T) int: document index per position of a packed window
        (seqlm/ops/docs.py); nothing crosses a document boundary. None: one stream."""
        check_seq_idx(seq_idx, *tokens.shape)
        x, pos = self._embed(tokens, state, seq_idx)
        x, state = self.stack(self.drop(x), state, seq_idx=seq_idx)
        return self.norm_f(x), self._with_pos(state, pos)

    def _embed(self, tokens: torch.Tensor, state, seq_idx=None):
        """Token (+ learned position) embeddings (B, T, D) and the position after them
        (with ``seq_idx``, positions restart at each document)."""
        x = self.embed(tokens)
        if self.pos_embed is None:
            return x, None
        start = 0 if state is None else state.pos
        end = start + tokens.shape[1]
        if end > self.pos_embed.num_embeddings:
            raise ValueError(f"model.max_positions: the model reads at most {self.pos_embed.num_embeddings} "
                             f"positions; {end} needed")
        if seq_idx is None:
            return x + self.pos_embed.weight[start:end], end
        t = torch.arange(tokens.shape[1], device=tokens.device)
        first = torch.where(doc_starts(seq_idx), t, 0).cummax(1).values     # (B, T) its document's start
        pos = torch.where(seq_idx == 0, t + start, t - first)                # document 0 continues a state
        return x + self.pos_embed(pos), end

    @staticmethod
    def _with_pos(state, pos):
        return state if state is None or pos is None else PosState(state, pos)

    def forward(self, tokens: torch.Tensor, state=None, seq_idx=None):
        """tokens (B, T) -> logits (B, T, V), new state (None when ``state`` is None)."""
        h, state = self.hidden(tokens, state, seq_idx)
        return self.head(h), state

    def set_activation_checkpointing(self, mode: str = "none", k: int = 1) -> None:
        """Recompute layer activations in backward (seqlm/stack.py): none | layers | every_k."""
        self.stack.set_checkpointing(mode, k)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             seq_idx=None) -> torch.Tensor:
        logits, _ = self(tokens, seq_idx=seq_idx)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)

    def init_state(self, batch: int, max_len: int, device=None, dtype=None):
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        st = self.stack.init_state(batch, max_len, device, dtype)
        return st if self.pos_embed is None else PosState(st, 0)

    def step(self, token: torch.Tensor, state):
        """token (B, 1) -> logits (B, 1, V), new state. O(1) in the context for SSM layers."""
        x, pos = self._embed(token, state)
        x, state = self.stack.step(x, state)
        return self.head(self.norm_f(x)), self._with_pos(state, pos)

    def compiled_step(self):
        """``step`` through ``torch.compile``, made once per model and kept.

        On CPU a decode step is a few dozen tiny ops per layer, each paying PyTorch's per-op
        overhead; inductor fuses the elementwise ones into generated C++ (bench/decode.py:
        a 7-layer Mamba-2 step ~3x faster). The first calls compile (tens of seconds, again
        for a new batch size), so it pays off for long generations, not for a few tokens.
        """
        fn = self.__dict__.get("_compiled_step")
        if fn is None:
            fn = torch.compile(self.step)
            self.__dict__["_compiled_step"] = fn  # a plain attribute: not a submodule or state
        return fn

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def tp_plan(self, tp: int = 1) -> dict:
        """Every parameter's TP spec (seqlm/blocks/plan.py): the stack's plan; the embeddings
        (token, learned positions), final norm and (tied) head are replicated."""
        plan = {rf"stack\.{k}": v for k, v in self.stack.tp_plan(tp).items()}
        plan.update({r"(pos_)?embed\.weight": "replicate", r"norm_f\..*": "replicate", r"head\.(weight|bias)": "replicate"})
        return plan

    # -- a self-contained model directory ---------------------------------------------
    def save_pretrained(self, directory, tokenizer=None, run_config=None, metrics: Optional[dict] = None):
        """Write ``directory``: config.yaml (``run_config``, or a RunConfig holding this model's
        section), model.safetensors, tokenizer/ (when given), meta.json and README.md (a model
        card with the config and ``metrics``). The same layout as a model-only checkpoint, so
        every command that takes ``--checkpoint`` reads it; :meth:`from_pretrained` and
        ``seqlm.load`` read it back. Written to a temp directory, then renamed into place."""
        return save_pretrained_dir(self, directory, tokenizer, run_config, metrics)

    @classmethod
    def from_pretrained(cls, directory, device="cpu", dtype=None) -> "LM":
        """The LM saved by :meth:`save_pretrained` (or any model-only seqlm checkpoint of a
        plain LM), in eval mode. ``seqlm.load`` also returns its tokenizer."""
        return load_pretrained_dir(cls, directory, device, dtype)

    # -- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        eos_id: Optional[int] = None,
        on_token: Optional[Callable[[torch.Tensor], None]] = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Prefill the prompt once, then step with the per-layer caches.

        prompt_ids: (T,) or (B, T). Returns the new tokens (B, max_new_tokens) (or (N,) for a
        1-D prompt; shorter if every row produced ``eos_id``). temperature 0 is greedy.
        ``compile``: decode steps through :meth:`compiled_step` (same tokens, faster steps
        after a one-off compile).
        """
        squeeze = prompt_ids.dim() == 1
        ids = prompt_ids[None] if squeeze else prompt_ids
        if ids.shape[1] == 0:
            raise ValueError("generate: the prompt must hold at least one token")
        B, T = ids.shape
        dev = self.embed.weight.device
        ids = ids.to(dev)
        gen = torch.Generator(device=dev)  # private: generating never moves the global RNG
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()  # fresh entropy for this generator only (torch.seed() reseeds the global one)
        step = self.compiled_step() if compile else self.step
        state = self.init_state(B, T + max_new_tokens)
        h, state = self.hidden(ids, state)
        logits = self.head(h[:, -1])  # prefill: only the last position's logits are needed
        out = []
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, gen)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if (eos_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits, state = step(nxt[:, None], state)
            logits = logits[:, -1]
        res = torch.stack(out, dim=1) if out else ids.new_zeros(B, 0)
        return res[0] if squeeze else res


class PosState(list):
    """The per-layer states plus ``pos``, the next token's position (learned-position models)."""

    def __init__(self, states, pos: int):
        super().__init__(states)
        self.pos = pos


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p  # keep the smallest prefix reaching top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
