"""Document-aware packing (``seq_idx``): the loss of a packed window equals, token by token,
the loss of its documents run separately (fp32, <= 1e-5) for every registered block type, and
for ladder, recursive and HMT topologies; the fast kernels against their references."""
import pytest
import torch
import torch.nn.functional as F

from seqlm import registry
from seqlm.config import parse_config
from seqlm.io import build_model
from seqlm.model import LM
from seqlm.ops.attention import attention, attention_ref
from seqlm.ops.conv import causal_conv1d_ref, causal_conv1d_tokens
from seqlm.ops.docs import check_seq_idx
from seqlm.ops.fftconv import fft_conv_docs, fft_conv_ref
from seqlm.ops.selective_scan import selective_scan, selective_scan_ref
from seqlm.ops.ssd import ssd_ref, ssd_scan

V = 23
NAMES = sorted(registry.blocks())
CHAR = {name: c for c, name in registry.pattern_chars().items()}
# two rows; row 0: documents of 5, 12, 1 (a one-token document) and 19 tokens; row 1: 9 + 28
LENS = [[5, 12, 1, 19], [9, 28]]
T = 37


def seq_idx_of(lens):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lens])


SI = seq_idx_of(LENS)


def make(pattern, seed=0, **model):
    # chunk sizes below the window, so documents cross chunk borders inside the kernels
    m = {"d_model": 32, "pattern": pattern, "block_defaults": {
        "attention": {"n_heads": 2}, "mamba": {"chunk_size": 8}, "mamba2": {"chunk_size": 8, "head_dim": 16}}}
    mem = model.pop("memory", None)
    m.update(model)
    cfg = parse_config({"model": m, **({"memory": mem} if mem else {})})
    torch.manual_seed(seed)
    net = build_model(cfg, V) if cfg.memory is not None else LM(cfg.model, V)
    with torch.no_grad():  # non-trivial LoRA (fresh LoRA B is zero)
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def packed_vs_separate(model, seed=1):
    torch.manual_seed(seed)
    x = torch.randint(0, V, (2, T))
    y = torch.randint(0, V, (2, T))
    logits, _ = model(x, seq_idx=SI)
    packed = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")       # (2, T)
    sep = torch.empty_like(packed)
    for r, lens in enumerate(LENS):
        s = 0
        for n in lens:
            lg, _ = model(x[r:r + 1, s:s + n])
            sep[r, s:s + n] = F.cross_entropy(lg.transpose(1, 2), y[r:r + 1, s:s + n], reduction="none")[0]
            s += n
    plain, _ = model(x)  # one stream: documents do see each other
    stream = F.cross_entropy(plain.transpose(1, 2), y, reduction="none")
    return packed, sep, stream


def _assert_packed(model):
    with torch.no_grad():
        packed, sep, stream = packed_vs_separate(model)
    torch.testing.assert_close(packed, sep, rtol=0, atol=1e-5)
    return packed, stream


@pytest.mark.parametrize("name", NAMES)
def test_packed_window_equals_separate_documents(name):
    packed, stream = _assert_packed(make(CHAR[name] + "-" if name != "mlp" else "-"))
    if name != "mlp":  # the mixer really mixes across the boundary without seq_idx
        assert (packed - stream).abs().max() > 1e-4


@pytest.mark.parametrize("topology", ["ladder", "recursive", "hmt", "parallel_learned_pos"])
def test_packed_window_topologies(topology):
    pattern = "".join(sorted(registry.pattern_chars()))  # every block type in one stack
    if topology == "ladder":
        model = make(pattern, residual="ladder")
    elif topology == "parallel_learned_pos":  # positions restart at each document
        model = make(pattern + "-" * (len(pattern) % 2), parallel_residual=True, pos_embedding="learned",
                     max_positions=64)
    elif topology == "recursive":
        model = make(pattern, n_layers=2 * len(pattern), recursive={"groups": len(pattern), "lora_rank": 2})
    else:
        model = make(pattern, memory={"segment_len": 6, "n_sensory": 2, "recall": True, "recall_cache": 2})
    _assert_packed(model)


def _packed_and_separate_grads(model, seed):
    """Parameter gradients of the summed packed loss and of the documents' losses run one by one."""
    torch.manual_seed(seed)
    x, y = torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T))
    params = list(model.parameters())
    logits, _ = model(x, seq_idx=SI)
    g1 = torch.autograd.grad(F.cross_entropy(logits.transpose(1, 2), y, reduction="sum"), params, allow_unused=True)
    tot = 0
    for r, lens in enumerate(LENS):
        s = 0
        for n in lens:
            lg, _ = model(x[r:r + 1, s:s + n])
            tot = tot + F.cross_entropy(lg.transpose(1, 2), y[r:r + 1, s:s + n], reduction="sum")
            s += n
    return g1, torch.autograd.grad(tot, params, allow_unused=True)


def test_packed_gradients_match_separate_documents():
    """The summed packed loss has the same parameter gradients as the documents' losses."""
    g1, g2 = _packed_and_separate_grads(make("M2H*-"), 2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_hmt_truncated_bptt_gradients():
    """HMT batches all documents' segments together (sorted by segment count): with
    bptt_depth, each document still detaches by its own segment count, so the gradients equal
    those of the documents run one by one (whose truncation tests/test_hmt.py checks)."""
    g1, g2 = _packed_and_separate_grads(make("*-", memory={"segment_len": 4, "n_sensory": 2, "bptt_depth": 2}), 3)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_seq_idx_validation():
    with pytest.raises(ValueError, match="seq_idx"):
        check_seq_idx(torch.tensor([[0, 1, 0]]), 1, 3)
    with pytest.raises(ValueError, match="seq_idx"):
        check_seq_idx(torch.tensor([[1, 1, 1]]), 1, 3)
    with pytest.raises(ValueError, match="shape"):
        check_seq_idx(torch.zeros(2, 3, dtype=torch.long), 1, 3)
    model = make("*-")
    with pytest.raises(ValueError, match="seq_idx"):
        model(torch.zeros(1, 4, dtype=torch.long), seq_idx=torch.tensor([[0, 0, 1, 0]]))


# -- kernels against their references (fp64) --------------------------------------------------
D64 = torch.float64


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs)


def _close_with_grads(fast, ref, inputs):
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(fast)
    for a, b in zip(_grads((fast * g).sum(), inputs), _grads((ref * g).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _ssd_inputs(H, P, G, N, b=2):
    """SSD inputs (x, dt, A, B, C) over the packed windows' T tokens, fp64, requiring grad."""
    torch.manual_seed(0)
    req = dict(dtype=D64, requires_grad=True)
    return (torch.randn(b, T, H, P, **req), torch.rand(b, T, H, **req), -torch.rand(H, dtype=D64).requires_grad_(),
            torch.randn(b, T, G, N, **req), torch.randn(b, T, G, N, **req))


@pytest.mark.parametrize("Q", [4, 8, 64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_scan_seq_idx_matches_ref(Q, with_h0):
    x, dt, A, Bm, Cm = _ssd_inputs(H=4, P=3, G=2, N=5)
    D = torch.randn(4, dtype=D64)
    b, H, P, N = 2, 4, 3, 5
    h0 = torch.randn(b, H, P, N, dtype=D64, requires_grad=True) if with_h0 else None
    y, h = ssd_scan(x, dt, A, Bm, Cm, Q, D=D, h0=h0, seq_idx=SI)
    yr, hr = ssd_ref(x, dt, A, Bm, Cm, D, h0, seq_idx=SI)
    ins = [x, dt, A, Bm, Cm] + ([h0] if with_h0 else [])
    _close_with_grads(torch.cat([y.flatten(), h.flatten()]), torch.cat([yr.flatten(), hr.flatten()]), ins)


def test_ssd_single_chunk_seq_idx_matches_ref():
    x, dt, A, Bm, Cm = _ssd_inputs(H=2, P=2, G=1, N=3)
    y, none = ssd_scan(x, dt, A, Bm, Cm, 64, return_state=False, seq_idx=SI)
    assert none is None
    _close_with_grads(y, ssd_ref(x, dt, A, Bm, Cm, seq_idx=SI)[0], [x, dt, A, Bm, Cm])


def test_selective_scan_seq_idx_matches_ref():
    torch.manual_seed(0)
    b, Dm, N = 2, 6, 4
    u = torch.randn(b, T, Dm, dtype=D64, requires_grad=True)
    de = torch.randn(b, T, Dm, dtype=D64, requires_grad=True)
    A = -torch.rand(Dm, N, dtype=D64, requires_grad=True)
    Bm = torch.randn(b, T, N, dtype=D64, requires_grad=True)
    Cm = torch.randn(b, T, N, dtype=D64, requires_grad=True)
    z = torch.randn(b, T, Dm, dtype=D64, requires_grad=True)
    Dv, bias = torch.randn(Dm, dtype=D64), torch.randn(Dm, dtype=D64)
    h0 = torch.randn(b, Dm, N, dtype=D64, requires_grad=True)
    y, h = selective_scan(u, de, A, Bm, Cm, Dv, z, bias, True, h0, 8, seq_idx=SI)
    yr, hr = selective_scan_ref(u, de, A, Bm, Cm, Dv, z, bias, True, h0, seq_idx=SI)
    _close_with_grads(torch.cat([y.flatten(), h.flatten()]), torch.cat([yr.flatten(), hr.flatten()]),
                      [u, de, A, Bm, Cm, z, h0])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act,K", [("silu", 4), (None, 4), (None, 9)])  # None: the boundary-correction path
def test_causal_conv_seq_idx_matches_ref(bias, act, K):
    torch.manual_seed(0)
    x = torch.randn(2, T, 5, dtype=D64, requires_grad=True)
    w = torch.randn(5, K, dtype=D64, requires_grad=True)
    bb = torch.randn(5, dtype=D64, requires_grad=True) if bias else None
    y, _ = causal_conv1d_tokens(x, w, bb, None, act, SI)
    yr = causal_conv1d_ref(x.transpose(1, 2), w, bb, act, SI).transpose(1, 2)
    _close_with_grads(y, yr, [x, w] + ([bb] if bias else []))


def test_causal_conv_seq_idx_state_is_last_document():
    """With a carried state: the state feeds document 0 only, and the new state holds only
    the last document's inputs (a later call continues that document)."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3, dtype=D64)
    w = torch.randn(3, 4, dtype=D64)
    si = torch.tensor([[0] * 4 + [1] * 6, [0] * 9 + [1]])
    full, _ = causal_conv1d_tokens(x, w, None, None, None, si)
    st = torch.zeros(2, 3, 3, dtype=D64)
    a, st = causal_conv1d_tokens(x[:, :6], w, None, st, None, si[:, :6])
    rest = si[:, 6:] - si[:, 5:6]  # the continuation's documents, renumbered from 0
    b, _ = causal_conv1d_tokens(x[:, 6:], w, None, st, None, rest)
    torch.testing.assert_close(torch.cat([a, b], 1), full)


@pytest.mark.parametrize("lens", [LENS, [[30, 7], [37]], [[37], [37]]])  # all documents / later ones / none
def test_fft_conv_docs_matches_ref(lens):
    torch.manual_seed(0)
    si = seq_idx_of(lens)
    u = torch.randn(2, 3, T, dtype=D64, requires_grad=True)
    k = torch.randn(3, T, dtype=D64, requires_grad=True)
    D = torch.randn(3, dtype=D64, requires_grad=True)
    _close_with_grads(fft_conv_docs(u, k, D, si), fft_conv_ref(u, k, D, si), [u, k, D])


def test_merge_sizes_trades_calls_for_padding():
    from seqlm.ops.docs import merge_sizes

    size = torch.tensor([2, 2, 3, 8, 8, 8, 64])
    assert merge_sizes(size, lambda n: n, 0).tolist() == size.tolist()       # calls are free: no padding
    assert merge_sizes(size, lambda n: n, 1e9).tolist() == [64] * 7           # calls are dear: one call
    # a call costs 5: the 2s pad to 3 (+2 < 5); joining the 8s would pad 3 documents by 5-6
    # (+16 > 5), the 64 by 56 each
    assert merge_sizes(size, lambda n: n, 5).tolist() == [3, 3, 3, 8, 8, 8, 64]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("path", ["mask", "buckets"])  # short windows: one masked call; long: buckets
def test_attention_seq_idx_matches_ref(window, path, monkeypatch):
    import seqlm.ops.attention as attn_mod

    monkeypatch.setattr(attn_mod, "DOC_MASK_MAX_LEN", T if path == "mask" else 0)
    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 8, dtype=D64, requires_grad=True)
    k = torch.randn(2, 2, T, 8, dtype=D64, requires_grad=True)
    v = torch.randn(2, 2, T, 8, dtype=D64, requires_grad=True)
    _close_with_grads(attention(q, k, v, 0, window, SI), attention_ref(q, k, v, 0, window, SI), [q, k, v])
    q, k, v = q.detach(), k.detach(), v.detach()
    # against a cache: keys before q_offset belong to document 0
    torch.testing.assert_close(attention(q[:, :, 30:], k, v, 30, window, SI[:, 30:]),
                               attention_ref(q[:, :, 30:], k, v, 30, window, SI[:, 30:]))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mlp"])
def test_block_seq_idx_with_state_continues_last_document(name):
    """forward(x, state, seq_idx) in two chunks == one stateless packed forward (the chunk
    border inside a document; the second chunk renumbers its documents from 0)."""
    cls = registry.get_block(name)
    torch.manual_seed(0)
    cfg = cls.Config(**({"n_heads": 2} if name == "attention" else {}))
    blk = cls(cfg, 32).double().eval()
    x = torch.randn(2, T, 32, dtype=D64)
    with torch.no_grad():
        ref, _ = blk(x, None, seq_idx=SI)
        st = blk.init_state(2, T, x.device, x.dtype)
        cut = 24  # row 0: inside the 19-token document; row 1: inside the 28-token one
        a, st = blk(x[:, :cut], st, seq_idx=SI[:, :cut])
        if name == "attention":  # a KV cache keeps every earlier document: not continuable
            return
        b, _ = blk(x[:, cut:], st, seq_idx=SI[:, cut:] - SI[:, cut - 1:cut])
    torch.testing.assert_close(torch.cat([a, b], 1), ref, rtol=1e-9, atol=1e-10)
