"""lm-evaluation-harness adapter: ``@register_model("seqlm")`` (optional extra ``lmeval``).

    seqlm lm-eval --model seqlm --model_args checkpoint=runs/default/checkpoint --tasks ...
    python -m seqlm.eval.lm_eval_adapter --model seqlm --model_args checkpoint=DIR --tasks ...

Both run lm-eval's own command line with this class registered under the name ``seqlm``
(lm-eval 0.4 has no plugin discovery, so a plain ``lm_eval`` process must import this module
first; from Python: ``import seqlm.eval.lm_eval_adapter`` then
``lm_eval.simple_evaluate(model="seqlm", model_args="checkpoint=DIR", tasks=[...])``).

Model args: ``checkpoint`` (required), ``device`` (auto), ``batch_size`` (8),
``max_length`` (context window; default the checkpoint's train.seq_len, unbounded for HMT
models), ``max_gen_toks`` (256).

Scoring rules: ``loglikelihood`` scores the continuation tokens given the context (context
truncated from the left to ``max_length``); ``loglikelihood_rolling`` is seqlm's own
sliding-window perplexity (:mod:`seqlm.eval.perplexity`: every token scored once, the text
prefixed by EOS); ``generate_until`` decodes with the per-layer caches until a stop string.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lm-eval is not installed: pip install -e '.[lmeval]'") from e


@register_model("seqlm")
class SeqLMEval(TemplateLM):
    def __init__(self, checkpoint: str, device: str = "auto", batch_size: int | str = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, **_ignored):
        super().__init__()
        from seqlm.eval.perplexity import is_unbounded
        from seqlm.io.pretrained import load_any as load_model

        device = str(device or "auto")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda by default
            print("seqlm: CUDA is not available; evaluating on the CPU", file=sys.stderr)
            device = "cpu"
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model, self.cfg, self.tok = load_model(checkpoint, dev)
        self._device = dev
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.unbounded = is_unbounded(self.model)
        self.max_length = int(max_length) if max_length else (None if self.unbounded else self.cfg.train.seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # -- TemplateLM hooks -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(i) for i in self.tok.encode(string)]

    def tok_decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from tqdm.auto import tqdm

        out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                out[i] = (0.0, True)
                continue
            whole = list(ctx) + list(cont)
            if self.max_length is not None:
                whole = whole[-(self.max_length + 1):]
            # a continuation longer than the window is scored on its last max_length tokens
            rows.append((i, whole[:-1], min(len(cont), len(whole) - 1)))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="seqlm loglikelihood")
        for b0 in range(0, len(rows), self.batch_size):
            batch = rows[b0:b0 + self.batch_size]
            L = max(len(r[1]) for r in batch)
            x = torch.zeros(len(batch), L, dtype=torch.long)
            for r, (_, inp, _) in enumerate(batch):
                x[r, :len(inp)] = torch.tensor(inp)  # right padding: causal, so harmless
            logits, _ = self.model(x.to(self._device))
            logp = F.log_softmax(logits.float(), -1).cpu()
            for r, (i, inp, n) in enumerate(batch):
                T = len(inp)
                lp = logp[r, T - n:T]  # predictions of the n continuation tokens
                tgt = torch.tensor(requests[i][2][-n:])
                score = float(lp.gather(-1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                out[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
            bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from seqlm.eval.perplexity import score_documents

        out = []
        for req in requests:
            (text,) = req.args
            ids = [self.eot_token_id] + self.tok_encode(text)
            res = score_documents(self.model, [ids], self.max_length, self.max_length, batch_size=self.batch_size,
                                  progress=False)
            out.append(-res["nll"])
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -res["nll"])
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from seqlm.model import sample

        out = []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0))
            if not kw.pop("do_sample", temperature > 0):
                temperature = 0.0
            gen = torch.Generator(device=self._device).manual_seed(int(kw.pop("seed", 0)))
            ids = self.tok_encode(context) or [self.eot_token_id]
            if self.max_length is not None:  # keep the last window of context; caches grow past it
                ids = ids[-self.max_length:]
            state = self.model.init_state(1, len(ids) + max_new)
            logits, state = self.model(torch.tensor([ids], device=self._device), state)
            logits = logits[:, -1]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                t = sample(logits, temperature, kw.get("top_k"), kw.get("top_p"), gen)
                if int(t) == self.eot_token_id:
                    break
                new.append(int(t))
                text = self.tok_decode(new)
                if any(s in text for s in until):
                    break
                logits, state = self.model.step(t[:, None], state)
                logits = logits[:, -1]
            for s in until:  # cut at the first stop string
                if s in text:
                    text = text[:text.index(s)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out


def main(argv: Optional[list[str]] = None) -> int:
    """lm-eval's command line with ``seqlm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
