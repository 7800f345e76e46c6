"""Sliding-window perplexity (every token scored once, == brute force) and the eval/generate CLI."""
import json
import math

import numpy as np
import pytest
import torch

from seqlm.config import parse_config
from seqlm.eval.perplexity import plan_windows, score_documents, summarize, token_nll_ref
from seqlm.io import build_model


def tiny_model(pattern="*-", seed=0, V=23):
    torch.manual_seed(seed)
    cfg = parse_config({"model": {"d_model": 16, "pattern": pattern, "n_layers": len(pattern), "vocab_size": V,
                                  "block_defaults": {"attention": {"n_heads": 2},
                                                     "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4}}},
                        "data": {"files": ["x.txt"]}})
    return build_model(cfg).double().eval()


@pytest.mark.parametrize("n,ctx,stride", [(2, 4, 2), (10, 4, 2), (37, 8, 3), (37, 8, 8), (37, None, None),
                                          (9, 100, 7), (50, 6, 1)])
def test_windows_score_every_target_once(n, ctx, stride):
    counts = np.zeros(n - 1, dtype=int)
    for s, T, j0 in plan_windows(n, ctx, stride):
        assert s >= 0 and s + T <= n - 1  # window reads ids[s:s+T] and predicts up to ids[s+T]
        counts[s + j0:s + T] += 1
        if ctx is not None:
            assert T == min(ctx, n - 1)
    assert (counts == 1).all()


@pytest.mark.parametrize("pattern", ["*-", "2-*"])
@pytest.mark.parametrize("ctx,stride,chunk", [(8, 3, 2048), (8, 8, 2048), (None, None, 2048), (12, 5, 4)])
def test_sliding_window_equals_brute_force(pattern, ctx, stride, chunk):
    model = tiny_model(pattern)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 23, (n,), generator=g).tolist() for n in (29, 17, 2)]
    res = score_documents(model, docs, ctx, stride, batch_size=3, chunk=chunk, progress=False, return_token_nll=True)
    total, count = 0.0, 0
    for d, got in zip(docs, res["token_nll"]):
        ref = token_nll_ref(model, d, ctx, stride)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
        total += ref.sum()
        count += len(ref)
    assert all((c == 1).all() for c in res["counts"])
    assert res["n_tokens"] == count == 28 + 16 + 1
    s = summarize(res, n_bytes=100)
    assert s["loss"] == pytest.approx(total / count)
    assert s["ppl"] == pytest.approx(math.exp(total / count))
    assert s["bits_per_byte"] == pytest.approx(total / math.log(2) / 100)


def test_more_context_lowers_loss_on_a_copy_task():
    """A model trained to copy (random P-token blocks repeated) can only predict the repeats
    by looking P tokens back: scored with full context it is far better on them than with a
    4-token window, which sits near chance (guards against ignoring --context)."""
    V, P = 23, 8
    torch.manual_seed(0)
    cfg = parse_config({"model": {"d_model": 32, "pattern": "*", "n_layers": 1, "vocab_size": V,
                                  "block_defaults": {"attention": {"n_heads": 2}}}, "data": {"files": ["x.txt"]}})
    model = build_model(cfg).train()  # one attention layer: a fixed-offset lookup P tokens back
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = torch.randint(0, V, (16, P), generator=g).repeat(1, 3)
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.double().eval()
    docs = [torch.randint(0, V, (P,), generator=g).repeat(3).tolist() for _ in range(4)]
    a = score_documents(model, docs, 4, 2, progress=False, return_token_nll=True)
    b = score_documents(model, docs, None, None, progress=False, return_token_nll=True)
    assert len(a["pos_sum"]) == 4 and len(b["pos_sum"]) == 3 * P - 1
    # targets P.. (token index >= P) repeat a token P back; token_nll[i] scores token i + 1
    short = np.mean([t[P - 1:].mean() for t in a["token_nll"]])
    full = np.mean([t[P - 1:].mean() for t in b["token_nll"]])
    assert short > 0.6 * math.log(V), (short, full)  # a 4-token window cannot see the repeat
    assert full < 0.35 * short, (short, full)


def _checkpoint(tmp_path):
    from tests.test_train import tiny_cfg
    from seqlm.train.loop import train

    res = train(tiny_cfg(tmp_path, max_steps=4))
    return res["checkpoint"]


def test_eval_ppl_and_generate_cli(tmp_path, capsys):
    from seqlm.cli import main
    from seqlm.io.checkpoint import load_model

    ck = _checkpoint(tmp_path)
    data = tmp_path / "eval.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 6)
    assert main(["eval", "ppl", "--checkpoint", ck, "--data", str(data), "--context", "16,full",
                 "--stride", "8", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    res = json.loads((tmp_path / "ev" / "ppl.json").read_text())
    assert set(res["contexts"]) == {"16", "full"}
    for r in res["contexts"].values():
        assert r["n_tokens"] == len(data.read_text())  # char tokenizer: every char scored once
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert 0 < r["bits_per_byte"] < 10
    assert (tmp_path / "ev" / "ppl_curve.png").stat().st_size > 1000
    capsys.readouterr()

    assert main(["generate", "--checkpoint", ck, "--prompt", "the quick", "--max-new-tokens", "12",
                 "--temperature", "0", "--quiet"]) == 0
    out = capsys.readouterr()
    model, _, tok = load_model(ck)
    want = tok.decode(model.generate(torch.tensor(tok.encode("the quick")), 12, temperature=0).tolist())
    assert out.out.rstrip("\n") == want
    assert "tokens/s" in out.err


@pytest.mark.parametrize("argv,needle", [
    (["eval", "ppl", "--data", "x.txt", "--context", "12,abc"], "--context"),
    (["eval", "ppl", "--data", "missing-file.txt"], "missing-file.txt"),
    (["generate", "--max-new-tokens", "3"], "--prompt"),
    (["generate", "--prompt", "a", "--top-p", "1.5"], "--top-p"),
])
def test_cli_errors_name_the_argument(tmp_path, capsys, argv, needle):
    from seqlm.cli import main

    ck = _checkpoint(tmp_path)
    assert main(argv[:2] + ["--checkpoint", ck] + argv[2:] if argv[0] == "eval" else
                argv[:1] + ["--checkpoint", ck] + argv[1:]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("pattern", ["*-", "M2H-"])
@pytest.mark.parametrize("ctx", [16, None])
def test_packed_documents_score_as_alone(pattern, ctx):
    """pack=True: short documents share windows (seq_idx) and score exactly as unpacked."""
    model = tiny_model(pattern)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 23, (n,), generator=g).tolist() for n in (5, 9, 2, 13, 40, 7, 3)]
    a = score_documents(model, docs, ctx, None, batch_size=3, chunk=24, progress=False, return_token_nll=True)
    b = score_documents(model, docs, ctx, None, batch_size=3, chunk=24, progress=False, return_token_nll=True,
                        pack=True)
    for ta, tb, cb in zip(a["token_nll"], b["token_nll"], b["counts"]):
        np.testing.assert_allclose(tb, ta, rtol=1e-9, atol=1e-10)
        assert (cb == 1).all()
    np.testing.assert_allclose(b["pos_sum"], a["pos_sum"], rtol=1e-9)
    assert (b["pos_cnt"] == a["pos_cnt"]).all()
