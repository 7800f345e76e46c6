"""Evaluation: sliding-window perplexity, long-context tasks (MQAR, passkey, needle,
phonebook), generation and the lm-eval-harness adapter.

- :mod:`seqlm.eval.perplexity` — every token scored once, loss / ppl / bits-per-byte per
  context length and the per-position loss curve.
- :mod:`seqlm.eval.tasks` — seeded task generators (training data with -100 labels) and
  checkpoint evaluators writing JSON + PNG; :func:`seqlm.eval.tasks.train_task.train_on_task`
  trains fresh models on a task (Zoology's recipe).
- :mod:`seqlm.eval.lm_eval_adapter` — ``@register_model("seqlm")`` for lm-eval (optional extra).
- :mod:`seqlm.eval.cli` — ``seqlm eval {ppl,mqar,passkey,needle,phonebook}``, ``seqlm generate``
  (streaming, per-layer caches, tokens/s) and ``seqlm lm-eval`` (lm-eval's CLI with seqlm registered).
"""
