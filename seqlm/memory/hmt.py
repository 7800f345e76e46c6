"""HMT — Hierarchical Memory Transformer (He et al., 2024) around any seqlm LM.

The backbone (embed -> stack -> norm_f -> head, any block types and stack topology) runs
segment by segment. Segment n (L tokens) is fed as

    [mem_n ; sensory_n ; x_n ; mem_n]        (B, n_mem + k + L + n_mem, D)

sensory_n = the last k = n_sensory token embeddings of segment n-1 (none for n = 0). The
token positions give the logits; the final-normed hidden states at the trailing n_mem
positions are the segment's memory embedding m_n (B, n_mem, D), pushed to a cache of the last
``recall_cache`` memories. The memory read by segment n:
- n = 0: the learned ``memory.initial``;
- stage 1 (recall off): m_{n-1};
- stage 2 (recall on): a query pass [recall_token ; query tokens ; recall_token] through the
  backbone gives q_n (its trailing n_mem outputs); mem_n = recall(q_n, cache) (see recall.py).
  Query tokens: the last query_len tokens before the segment (``query_source: previous``,
  causal) or the segment's first query_len tokens (``segment``, the paper; not causal).

Two paths compute the same function:
- stateless ``forward(tokens)`` (training, whole-window eval): one backbone call per segment.
  Truncated BPTT: everything carried out of segment j (m_j, sensory/query embeddings) is
  detached when j < S - bptt_depth (S = segments in the window), so the loss reaches back
  through at most the last bptt_depth segments.
- stateful ``forward(tokens, state)`` / ``step`` (streaming eval, ``generate``): chunks of
  any size; the state holds one segment's backbone state (sized for n_mem + k + L + n_mem
  positions), the previous memory, the cache (<= recall_cache) and <= max(k, query_len) token
  embeddings, so memory is bounded by the segment, not by the input. What the state carries
  across segments is detached (train with the stateless path).

Packed windows (``seq_idx``, seqlm/ops/docs.py): every document is run as its own input, its
segments aligned to its first token, starting from the initial memory with an empty cache,
so no memory crosses a document boundary. All documents run as one batch, sorted by segment
count and right-padded to whole segments: segment n is one backbone call over the documents
that have an n-th segment (causal backbone: the padding never reaches a real token; a
document's last, padded segment writes no memory).
"""
from __future__ import annotations

from typing import Optional

import torch

from seqlm.config import MemoryConfig, ModelConfig
from seqlm.memory.recall import HMTMemory
from seqlm.model import LM
from seqlm.ops.docs import check_seq_idx, from_slots, segments, slot_of, to_slots


class HMT(LM):
    """An LM whose forward runs segment by segment with HMT memory. Same interface as LM
    (forward/loss/step/init_state/generate/num_params/tp_plan); state-dict keys are the
    LM's plus ``memory.*``, so plain-LM and stage-1 checkpoints initialise it (recall.py)."""

    def __init__(self, cfg: ModelConfig, mcfg: MemoryConfig, vocab_size: Optional[int] = None):
        super().__init__(cfg, vocab_size)
        self.mcfg = mcfg
        self.seg_len, self.n_mem, self.n_sens = mcfg.segment_len, mcfg.n_memory, mcfg.n_sensory
        self.query_len = mcfg.query_len or max(1, mcfg.segment_len // 2)
        self.recall_on = bool(mcfg.recall)
        self.causal_query = mcfg.query_source == "previous"
        self.memory = HMTMemory(cfg.d_model, mcfg, cfg.init_std)
        # token embeddings of the previous segment a segment needs: sensory and query tokens
        self.keep = max(self.n_sens, self.query_len if self.recall_on and self.causal_query else 0)

    @property
    def backbone_window(self) -> int:
        """Most positions the backbone sees in one segment: n_mem + k + L + n_mem."""
        return 2 * self.n_mem + self.n_sens + self.seg_len

    # -- shared pieces -------------------------------------------------------------------
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Stateless backbone pass: (B, N, D) input embeddings -> final-normed (B, N, D)."""
        h, _ = self.stack(x, None)
        return self.norm_f(h)

    def _query(self, toks: torch.Tensor) -> torch.Tensor:
        """Recall query pass: toks (B, j, D) -> q (B, n_mem, D)."""
        rt = self.memory.query_tokens(toks.shape[0]).to(toks.dtype)
        return self._run(torch.cat([rt, toks, rt], 1))[:, -self.n_mem:]

    def _read(self, batch: int, last, cache, query_toks) -> torch.Tensor:
        """The memory embedding a segment reads (B, n_mem, D)."""
        if not self.recall_on:
            return self.memory.initial_memory(batch) if last is None else last
        if cache is None:
            return self.memory.initial_memory(batch)
        if cache.shape[1] == 1:  # softmax over one entry is exactly that entry
            return cache[:, 0]
        return self.memory.recall(self._query(query_toks), cache)

    def _push(self, cache, m):
        """Append m (B, n_mem, D) to the cache (B, N, n_mem, D), keeping the last recall_cache."""
        if not self.recall_on:
            return None
        c = m[:, None] if cache is None else torch.cat([cache, m[:, None]], 1)
        return c[:, -self.mcfg.recall_cache:]

    # -- stateless path (training) -------------------------------------------------------
    def _segments(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, T, D) token embeddings -> final-normed hidden states (B, T, D)."""
        B, T, _ = emb.shape
        S = -(-T // self.seg_len)
        out = self._run_segments(emb, [S] * B, [T] * B)
        return torch.cat(out, 1) if out else emb

    def _run_segments(self, emb: torch.Tensor, nseg: list[int], lens: list[int]) -> list[torch.Tensor]:
        """Rows of emb (R, >= max(lens), D) run segment by segment; row r has ``nseg[r]``
        segments and ``lens[r]`` real tokens (non-increasing ``nseg``: segment n runs the
        first cnt_n rows, those with nseg > n; right padding past lens[r] reaches no real
        token). Returns per segment n its hidden states (cnt_n, w_n, D), w_n = L unless no
        row continues (then the longest real remainder)."""
        L, nm, k = self.seg_len, self.n_mem, self.n_sens
        S = nseg[0] if nseg else 0
        rows = [sum(1 for s in nseg if s > n) for n in range(S + 1)]  # rows with > n segments

        def cnt(n: int) -> int:
            return rows[n] if n <= S else 0

        last = cache = prev = None  # prev: (rows, keep, D) tail of the previous segment
        out = []
        for n in range(S):
            r, rn = cnt(n), cnt(n + 1)
            w = L if rn else min(L, max(lens[:r]) - n * L)
            x = emb[:r, n * L:n * L + w]  # (r, w, D)
            if self.recall_on and not self.causal_query:
                q_toks = x[:, :self.query_len]
            else:
                q_toks = None if prev is None else prev[:, prev.shape[1] - self.query_len:]
            mem = self._read(r, last, cache, q_toks)  # (r, nm, D)
            sens = prev[:, prev.shape[1] - k:] if (k and prev is not None) else x[:, :0]
            write = rn > 0  # a later segment of these rows reads m_n
            h = self._run(torch.cat([mem, sens, x] + ([mem] if write else []), 1))
            a = nm + sens.shape[1]
            out.append(h[:, a:a + w])
            if write:
                m, tail = h[:rn, -nm:], x[:rn, L - self.keep:]
                # truncated BPTT: nothing carried out of segment n keeps its graph in rows
                # with more than n + bptt_depth segments (a prefix of the rows)
                j = cnt(n + self.mcfg.bptt_depth) if self.mcfg.bptt_depth else 0
                if j:
                    m = torch.cat([m[:j].detach(), m[j:]]) if j < rn else m.detach()
                    tail = torch.cat([tail[:j].detach(), tail[j:]]) if j < rn else tail.detach()
                last, prev = m, tail
                cache = self._push(None if cache is None else cache[:rn], m)
        return out

    def _documents(self, emb: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
        """emb (B, T, D), seq_idx (B, T) -> hidden states (B, T, D), each document run alone.

        All documents run together, one backbone call per segment index: they are sorted by
        segment count (longest first) and right-padded to whole segments, so segment n runs
        the documents that have one (a prefix of the rows)."""
        B, T, D = emb.shape
        L = self.seg_len
        starts, lens = segments(seq_idx)
        nseg = (lens + L - 1) // L
        order = torch.argsort(nseg, descending=True, stable=True)
        starts, lens, nseg = starts[order], lens[order], nseg[order]
        m, S = len(lens), int(nseg[0])
        ar = torch.arange(S * L)
        valid = ar < lens[:, None]                                    # (m, S*L)
        src = torch.where(valid, starts[:, None] + ar, 0).reshape(-1)
        dev = emb.device
        x = to_slots(emb.reshape(B * T, D), src.to(dev), slot_of(src, valid.reshape(-1), B * T).to(dev))
        x = x.view(m, S * L, D) * valid.to(dev)[..., None].to(emb.dtype)  # padding: zero embeddings
        hs = self._run_segments(x, nseg.tolist(), lens.tolist())
        # token (document j, offset o) -> its output slot in the segments' outputs, step-major
        widths = torch.tensor([h.shape[1] for h in hs])
        base = torch.tensor([0] + [h.shape[0] * h.shape[1] for h in hs[:-1]]).cumsum(0)
        j, o = valid.nonzero(as_tuple=True)
        n = o // L
        inv = torch.empty(B * T, dtype=torch.long)
        inv[src[j * S * L + o]] = base[n] + j * widths[n] + o - n * L
        out = from_slots(torch.cat([h.reshape(-1, D) for h in hs]), inv.to(dev))
        return out.view(B, T, D)

    # -- stateful path (streaming, generation) -------------------------------------------
    def init_state(self, batch: int, max_len: int = 0, device=None, dtype=None):
        """A fresh streaming state; ``max_len`` is ignored (memory is bounded by the segment)."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return {"seg": 0, "pos": 0, "bb": None, "mem": None, "last": None, "cache": None, "prev": None,
                "tail": torch.zeros(batch, 0, self.cfg.d_model, device=device, dtype=dtype)}

    def _open(self, st: dict, batch: int) -> None:
        """Start a segment: read its memory and feed [mem ; sensory] to a fresh backbone state."""
        prev, k = st["prev"], self.n_sens
        q_toks = None if prev is None else prev[:, prev.shape[1] - self.query_len:]
        mem = self._read(batch, st["last"], st["cache"], q_toks)
        sens = prev[:, prev.shape[1] - k:] if (k and prev is not None) else mem[:, :0]
        ref = self.embed.weight
        bb = self.stack.init_state(batch, self.backbone_window, ref.device, ref.dtype)
        _, bb = self.stack(torch.cat([mem, sens], 1), bb)
        st.update(bb=bb, mem=mem, pos=0)

    def _close(self, st: dict) -> None:
        """End a full segment: feed the trailing memory, take m_n, roll the carried tensors."""
        h, _ = self.stack(st["mem"], st["bb"])
        m = self.norm_f(h)[:, -self.n_mem:].detach()  # (B, nm, D)
        st.update(last=m, cache=self._push(st["cache"], m), prev=st["tail"].detach(),
                  tail=st["tail"][:, :0], bb=None, mem=None, pos=0, seg=st["seg"] + 1)

    def _stream(self, emb: torch.Tensor, st: dict) -> torch.Tensor:
        if self.recall_on and not self.causal_query:
            raise ValueError("memory.query_source: `segment` reads the first query_len tokens of a segment "
                             "before predicting them (the paper's recipe, not causal), so streaming "
                             "evaluation and generation cannot use it; use query_source: previous")
        B, T, _ = emb.shape
        out, i = [], 0
        while i < T:
            if st["bb"] is None:
                self._open(st, B)
            take = min(T - i, self.seg_len - st["pos"])
            x = emb[:, i:i + take]  # (B, take, D)
            run = self.stack.step if take == 1 else self.stack
            h, st["bb"] = run(x, st["bb"])
            out.append(self.norm_f(h))
            tail = torch.cat([st["tail"], x], 1)
            st["tail"] = tail[:, tail.shape[1] - min(self.keep, tail.shape[1]):]
            st["pos"] += take
            i += take
            if st["pos"] == self.seg_len:
                self._close(st)
        return torch.cat(out, 1) if out else emb

    # -- the LM interface ------------------------------------------------------------------
    def hidden_from_embeddings(self, emb: torch.Tensor, state=None, seq_idx=None):
        """Token embeddings (B, T, D) -> final-normed hidden states (B, T, D), new state.
        ``seq_idx`` (B, T): documents of a packed window, each run on its own (stateless only)."""
        if seq_idx is not None:
            if state is not None:
                raise ValueError("seq_idx: HMT takes document boundaries only in the stateless "
                                 "(training / whole-window) path, not with a streaming state")
            check_seq_idx(seq_idx, emb.shape[0], emb.shape[1])
            return self._documents(emb, seq_idx), None
        if state is None:
            return self._segments(emb), None
        return self._stream(emb, state), state

    def hidden(self, tokens: torch.Tensor, state=None, seq_idx=None):
        return self.hidden_from_embeddings(self.drop(self.embed(tokens)), state, seq_idx)

    def step(self, token: torch.Tensor, state):
        """token (B, 1) -> logits (B, 1, V); rolls to a new segment when the current one fills."""
        h, state = self.hidden(token, state)
        return self.head(h), state

    def tp_plan(self, tp: int = 1) -> dict:
        plan = super().tp_plan(tp)
        plan[r"memory\..*"] = "replicate"  # tiny: initial memory, recall token, W_q, W_k
        return plan

    def param_counts(self) -> dict:
        """Backbone vs HMT parameters (the paper reports 0.5-2% extra)."""
        extra = sum(p.numel() for p in self.memory.parameters())
        backbone = self.num_params() - extra
        return {"backbone": backbone, "hmt": extra, "hmt_pct_of_backbone": 100.0 * extra / backbone}

    def extra_repr(self) -> str:
        c = self.param_counts()
        return (f"segment_len={self.seg_len}, n_memory={self.n_mem}, n_sensory={self.n_sens}, "
                f"recall={self.recall_on}, hmt_params={c['hmt']} ({c['hmt_pct_of_backbone']:.2f}% of backbone)")
