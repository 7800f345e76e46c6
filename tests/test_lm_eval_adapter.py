"""lm-eval adapter: its scores equal seqlm's own, and the shipped offline tasks run end to end."""
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional 'lmeval' extra")  # noqa: F841

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.test_train import tiny_cfg
    from seqlm.train.loop import train

    tmp = tmp_path_factory.mktemp("lmeval")
    cfg = tiny_cfg(tmp, max_steps=6)
    # the shipped tasks are Tiny Shakespeare text: fit the char tokenizer on the bundled corpus
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"files": [str(ROOT / "data" / "tinyshakespeare.txt")]})})
    return train(cfg)["checkpoint"]


class Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_equals_seqlm_scoring(checkpoint):
    from seqlm.eval.lm_eval_adapter import SeqLMEval
    from seqlm.io.checkpoint import load_model

    lm = SeqLMEval(checkpoint=checkpoint, batch_size=3)
    model, _, tok = load_model(checkpoint)
    pairs = [("the quick brown", " fox"), ("line three: the", " lazy dog."), ("", "jumps over"),
             ("a" * 40, " the quick brown")]
    got = lm.loglikelihood([Req(c, x) for c, x in pairs], disable_tqdm=True)
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        c_ids = tok.encode(ctx) if ctx else [tok.eos_id]
        x_ids = tok.encode(cont)
        ids = (list(c_ids) + list(x_ids))[-(lm.max_length + 1):]
        logits, _ = model(torch.tensor([ids[:-1]]))
        lp = F.log_softmax(logits[0], -1)[-len(x_ids):]
        want = float(lp.detach().gather(-1, torch.tensor(x_ids)[:, None]).sum())
        assert score == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(x_ids)).all())

    # rolling = seqlm's sliding-window perplexity over EOS + text
    from seqlm.eval.perplexity import token_nll_ref

    text = "the quick brown fox jumps over the lazy dog. " * 2
    (roll,) = lm.loglikelihood_rolling([Req(text)])
    ref = token_nll_ref(model, [tok.eos_id] + list(tok.encode(text)), lm.max_length, lm.max_length)
    assert roll == pytest.approx(-ref.sum(), rel=1e-5)


def test_generate_until_stops_at_stop_string(checkpoint):
    from seqlm.eval.lm_eval_adapter import SeqLMEval
    from seqlm.io.checkpoint import load_model

    lm = SeqLMEval(checkpoint=checkpoint)
    model, _, tok = load_model(checkpoint)
    free = lm.generate_until([Req("KING RICHARD", {"until": [], "max_gen_toks": 20})])[0]
    want = tok.decode(model.generate(torch.tensor(tok.encode("KING RICHARD")), 20, temperature=0).tolist())
    assert free == want
    stop = free[3:5]
    cut = lm.generate_until([Req("KING RICHARD", {"until": [stop], "max_gen_toks": 20})])[0]
    assert cut == free[:free.index(stop)]


def test_offline_local_tasks_end_to_end(checkpoint, tmp_path, monkeypatch):
    """The shipped task YAMLs + local jsonl through lm_eval.simple_evaluate, no hub access."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(ROOT)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import seqlm.eval.lm_eval_adapter  # noqa: F401  (registers "seqlm")

    tm = TaskManager(include_path=str(ROOT / "eval" / "lm_eval_tasks"))
    res = simple_evaluate(model="seqlm", model_args=f"checkpoint={checkpoint}",
                          tasks=["seqlm_shakespeare_mc", "seqlm_shakespeare_ppl", "seqlm_shakespeare_gen"],
                          task_manager=tm, limit=4, bootstrap_iters=0, log_samples=False)
    r = res["results"]
    assert 0.0 <= r["seqlm_shakespeare_mc"]["acc,none"] <= 1.0
    bpb = r["seqlm_shakespeare_ppl"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and 0 < bpb < 10
    assert "exact_match,none" in r["seqlm_shakespeare_gen"]
