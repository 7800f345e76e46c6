#!/usr/bin/env python
"""seqlm's Mamba-1 / Mamba-2 blocks vs the pure-PyTorch paths of Hugging Face transformers.

For each pair (seqlm ``mamba`` block vs ``transformers`` ``MambaMixer``, seqlm ``mamba2``
block vs ``Mamba2Mixer``):
1. build the HF mixer from a config with the same shapes (no hub access: HF_HUB_OFFLINE=1,
   configs only, no weights downloaded) and copy the seqlm weights into it;
2. check both compute the same function on one random input (batch 1, fp32, length L):
   max |y_seqlm - y_hf| must be <= 1e-4 (the script exits non-zero otherwise);
3. time forward+backward (loss ``(y * g).sum()`` with a fixed random g, so gradients reach
   every parameter and the input): median of ``--repeats`` passes after ``--warmup`` passes,
   passes alternating between the two modules so machine noise hits both alike.

Without CUDA kernels installed (mamba-ssm, causal-conv1d, or the ``kernels`` hub package)
HF's mixers run their torch fallbacks. Mamba-2: the chunked SSD written with einsums
(``mamba2_chunk_scan``'s fallback), compared at the same chunk size twice: 256 (HF's default)
and 64 (seqlm's default, and HF's fastest chunk on this CPU: ``hf_chunk_sweep`` times HF alone
at 32..256), then each at its own default (seqlm 64 vs HF 256; same function, checked).
Mamba-1: with ``use_mambapy=True`` (pip ``mambapy``, a pure-PyTorch parallel scan) at the
full length; HF's default fallback, a Python loop over the tokens whose backward is
quadratic in L, only at ``--seq-L`` (256). Each row also times the block's nn.Linear layers
alone (the same dense matmuls in both implementations) and reports the speedup on the rest.
The target is seqlm >= 3x faster forward+backward.

Threads: 2 by default. On a 2-core machine shared with another busy process, 2 threads
make every op wait on its preempted OpenMP partner and the timings (and ratios) swing by up
to 10x; use ``--threads 1`` there.

Prints one JSON object and writes bench/results/hf_compare.json.

    python bench/hf_compare.py              # L = 4096, 2 threads
    python bench/hf_compare.py --quick      # L = 1024, fewer repeats
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import machine_info  # noqa: E402

D_MODEL = 256
TOL = 1e-4


# -- module pairs ------------------------------------------------------------------------
def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name}: shape {tuple(src.shape)} does not fit HF's {tuple(dst.shape)}")
    dst.copy_(src)


def mamba2_pair(d_state: int, chunk: int, hf_chunk: int | None = None):
    from transformers import Mamba2Config as HFConfig
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from seqlm.blocks.mamba2 import Mamba2, Mamba2Config

    cfg = Mamba2Config(d_state=d_state, d_conv=4, expand=2, head_dim=64, ngroups=1, chunk_size=chunk)
    ours = Mamba2(cfg, D_MODEL)
    d_inner = cfg.expand * D_MODEL
    hf_cfg = HFConfig(
        vocab_size=16, hidden_size=D_MODEL, num_hidden_layers=1, state_size=cfg.d_state,
        expand=cfg.expand, conv_kernel=cfg.d_conv, head_dim=cfg.head_dim,
        num_heads=d_inner // cfg.head_dim, n_groups=cfg.ngroups, chunk_size=hf_chunk or cfg.chunk_size,
        use_bias=cfg.bias, use_conv_bias=cfg.conv_bias, hidden_act="silu",
        layer_norm_epsilon=cfg.norm_eps,
        # seqlm applies no clamp to dt after softplus; HF's default (0, inf) is a no-op clamp
        time_step_limit=(0.0, float("inf")),
    )
    hf = Mamba2Mixer(hf_cfg, layer_idx=0)
    with torch.no_grad():
        # in_proj rows are [z | x B C | dt] in both
        _copy(hf.in_proj.weight, ours.in_proj.weight, "in_proj.weight")
        _copy(hf.conv1d.weight, ours.conv_weight[:, None, :], "conv_weight (C,K) -> conv1d.weight (C,1,K)")
        _copy(hf.conv1d.bias, ours.conv_bias, "conv_bias")
        for n in ("A_log", "D", "dt_bias"):
            _copy(getattr(hf, n), getattr(ours, n), n)
        _copy(hf.norm.weight, ours.norm.weight, "norm.weight")
        _copy(hf.out_proj.weight, ours.out_proj.weight, "out_proj.weight")
    meta = {"d_model": D_MODEL, "d_state": cfg.d_state, "expand": cfg.expand, "d_conv": cfg.d_conv,
            "head_dim": cfg.head_dim, "heads": d_inner // cfg.head_dim, "ngroups": cfg.ngroups,
            "chunk_size": cfg.chunk_size, "chunk_size_hf": hf_cfg.chunk_size}
    return ours, hf, meta


def mamba_pair(d_state: int, chunk: int, use_mambapy: bool):
    from transformers import MambaConfig as HFConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from seqlm.blocks.mamba import Mamba, MambaConfig

    cfg = MambaConfig(d_state=d_state, d_conv=4, expand=2, chunk_size=chunk)
    ours = Mamba(cfg, D_MODEL)
    hf_cfg = HFConfig(
        vocab_size=16, hidden_size=D_MODEL, num_hidden_layers=1, state_size=cfg.d_state,
        expand=cfg.expand, conv_kernel=cfg.d_conv, time_step_rank=cfg.rank(D_MODEL),
        use_bias=cfg.bias, use_conv_bias=cfg.conv_bias, hidden_act="silu",
        use_mambapy=use_mambapy,
    )
    hf = MambaMixer(hf_cfg, layer_idx=0)
    with torch.no_grad():
        # in_proj rows are [x | z] in both; x_proj rows [dt (rank) | B | C] in both
        _copy(hf.in_proj.weight, ours.in_proj.weight, "in_proj.weight")
        _copy(hf.conv1d.weight, ours.conv_weight[:, None, :], "conv_weight (C,K) -> conv1d.weight (C,1,K)")
        _copy(hf.conv1d.bias, ours.conv_bias, "conv_bias")
        _copy(hf.x_proj.weight, ours.x_proj.weight, "x_proj.weight")
        _copy(hf.dt_proj.weight, ours.dt_proj.weight, "dt_proj.weight")
        _copy(hf.dt_proj.bias, ours.dt_proj.bias, "dt_proj.bias")
        _copy(hf.A_log, ours.A_log, "A_log")
        _copy(hf.D, ours.D, "D")
        _copy(hf.out_proj.weight, ours.out_proj.weight, "out_proj.weight")
    meta = {"d_model": D_MODEL, "d_state": cfg.d_state, "expand": cfg.expand, "d_conv": cfg.d_conv,
            "dt_rank": cfg.rank(D_MODEL), "chunk_size": cfg.chunk_size,
            "hf_path": "mambapy pscan (use_mambapy=True)" if use_mambapy else "sequential loop over L"}
    return ours, hf, meta


def _run(mod, x, is_hf: bool):
    y = mod(x)
    return y if is_hf else y[0]


def _params(mod) -> int:
    return sum(p.numel() for p in mod.parameters())


# -- one comparison ----------------------------------------------------------------------
def compare(name: str, build, L: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    ours, hf, meta = build()
    ours.train(), hf.train()  # HF's training path; with no CUDA kernels it is the torch fallback
    x = torch.randn(1, L, D_MODEL)
    g = torch.randn(1, L, D_MODEL)

    # 1. same function?
    with torch.no_grad():
        y_ours = _run(ours, x, False)
        y_hf = _run(hf, x, True)
    diff = (y_ours - y_hf).abs().max().item()
    scale = y_hf.abs().max().item()
    # gradients w.r.t. the input too (same loss), a check on the backward paths
    xo, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    (_run(ours, xo, False) * g).sum().backward()
    (_run(hf, xh, True) * g).sum().backward()
    gdiff = (xo.grad - xh.grad).abs().max().item()
    po, ph = dict(ours.named_parameters()), dict(hf.named_parameters())
    pdiff = {n: (po[n].grad - ph[n].grad).abs().max().item()
             for n in ("in_proj.weight", "out_proj.weight", "A_log", "D")}
    ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)

    # 2. forward+backward time, interleaved
    cpu = {id(ours): [], id(hf): []}  # process CPU time per pass (less sensitive to a busy machine)

    def fb(mod, is_hf):
        xi = x.clone().requires_grad_()
        c0, t0 = time.process_time(), time.perf_counter()
        (_run(mod, xi, is_hf) * g).sum().backward()
        dt = time.perf_counter() - t0
        cpu[id(mod)].append(time.process_time() - c0)
        mod.zero_grad(set_to_none=True)
        return dt

    # the in/out projections are the same dense matmuls in both implementations: time them
    # alone so the report can say how much of each pass is shared work
    lin = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]

    lin_in = [torch.randn(1, L, m.in_features) for m in lin]

    def proj():
        xs = [t.clone().requires_grad_() for t in lin_in]
        t0 = time.perf_counter()
        for m, xi in zip(lin, xs):
            m(xi).sum().backward()
        dt = time.perf_counter() - t0
        ours.zero_grad(set_to_none=True)
        return dt

    for _ in range(warmup):
        fb(ours, False), fb(hf, True), proj()
    t_ours, t_hf, t_proj = [], [], []
    cpu[id(ours)].clear(), cpu[id(hf)].clear()
    for _ in range(repeats):
        t_ours.append(fb(ours, False))
        t_hf.append(fb(hf, True))
        t_proj.append(proj())
    mo, mh, mp = statistics.median(t_ours), statistics.median(t_hf), statistics.median(t_proj)
    return {
        "block": name, "L": L, "batch": 1, "dtype": "float32", **meta,
        "params_seqlm": _params(ours), "params_hf": _params(hf),
        "max_abs_diff_y": diff, "max_abs_y": scale, "max_abs_diff_grad_x": gdiff,
        "max_abs_grad_x": xh.grad.abs().max().item(), "max_abs_diff_grad_params": pdiff,
        "match": diff <= TOL and gdiff <= TOL,
        "fwd_bwd_s_seqlm": mo, "fwd_bwd_s_hf": mh, "speedup": mh / mo,
        "speedup_of_min_times": min(t_hf) / min(t_ours),  # less sensitive to a busy machine
        "cpu_s_seqlm": statistics.median(cpu[id(ours)]), "cpu_s_hf": statistics.median(cpu[id(hf)]),
        "speedup_cpu_time": statistics.median(cpu[id(hf)]) / statistics.median(cpu[id(ours)]),
        "linear_layers_fwd_bwd_s": mp,
        "speedup_excluding_linear_layers": (mh - mp) / max(mo - mp, 1e-9),
        # the most any implementation sharing these dense projections could reach: seqlm's
        # pass cut to its linear layers alone (everything else free)
        "speedup_bound_linear_layers_only": mh / mp,
        "times_seqlm": t_ours, "times_hf": t_hf,
    }


def hf_chunk_sweep(d_state: int, L: int, chunks: list[int], warmup: int, repeats: int) -> dict:
    """HF's Mamba-2 mixer alone at several chunk sizes (same weights and input each time):
    median forward+backward seconds per chunk size, so the report can say which chunk is HF's
    fastest on this machine (a like-for-like comparison uses that one, not just its default)."""
    times = {}
    for c in chunks:
        torch.manual_seed(0)
        _, hf, _ = mamba2_pair(d_state, c)
        hf.train()
        x, g = torch.randn(1, L, D_MODEL), torch.randn(1, L, D_MODEL)
        ts = []
        for i in range(warmup + repeats):
            xi = x.clone().requires_grad_()
            t0 = time.perf_counter()
            (hf(xi) * g).sum().backward()
            ts.append(time.perf_counter() - t0)
            hf.zero_grad(set_to_none=True)
        times[c] = statistics.median(ts[warmup:])
    return {"L": L, "repeats": repeats, "fwd_bwd_s_hf": times, "fastest_chunk": min(times, key=times.get)}


def profile_mamba2(d_state: int, chunk: int, L: int, top: int = 12) -> dict:
    """Where one seqlm Mamba-2 forward+backward spends its time: self CPU time per aten op
    (the in/out projections are the aten::mm rows) and per region of the forward."""
    from torch.profiler import profile, record_function

    import seqlm.blocks.mamba2 as m2

    torch.manual_seed(0)
    blk = m2.Mamba2(m2.Mamba2Config(d_state=d_state, d_conv=4, expand=2, head_dim=64, chunk_size=chunk),
                    D_MODEL)
    x, g = torch.randn(1, L, D_MODEL), torch.randn(1, L, D_MODEL)
    orig = {n: getattr(m2, n) for n in ("causal_conv1d_tokens", "ssd_scan", "gated_rms_norm")}

    def region(name, f):
        def w(*args, **kw):
            with record_function(f"forward:{name}"):
                return f(*args, **kw)
        return w

    def fb():
        xi = x.clone().requires_grad_()
        (blk(xi)[0] * g).sum().backward()
        blk.zero_grad(set_to_none=True)

    fb()
    try:
        for n, f in orig.items():
            setattr(m2, n, region(n, f))
        with profile() as prof:
            fb()
    finally:
        for n, f in orig.items():
            setattr(m2, n, f)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    ops = sorted((e for e in ev if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "chunk_size": chunk, "L": L, "total_self_cpu_ms": total / 1e3,
        "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "share": e.self_cpu_time_total / total} for e in ops],
        "forward_regions_ms": {e.key: e.cpu_time_total / 1e3 for e in ev if e.key.startswith("forward:")},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L = 1024, 1 warm-up, 3 repeats")
    ap.add_argument("--L", type=int, default=None, help="sequence length (default 4096; quick 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=256,
                    help="Mamba-2 SSD chunk size for both in the first row (HF's default)")
    ap.add_argument("--seqlm-chunk", type=int, default=64,
                    help="seqlm's default chunk: extra Mamba-2 rows at it (both; seqlm vs HF at --chunk) "
                         "and the Mamba-1 scan's chunk; 0 = no extra rows, Mamba-1 at --chunk")
    ap.add_argument("--mamba2-d-state", type=int, default=64)
    ap.add_argument("--mamba-d-state", type=int, default=16)
    ap.add_argument("--seq-L", type=int, default=256,
                    help="length for the Mamba-1 comparison against HF's sequential fallback")
    ap.add_argument("--hf-chunk-sweep", type=lambda v: [int(c) for c in v.split(",") if c], default=[32, 64, 128, 256],
                    help="chunk sizes at which to time HF's Mamba-2 mixer alone ('' = skip): which is its fastest")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="add a torch.profiler breakdown of one seqlm Mamba-2 forward+backward")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hf_compare.json")
    a = ap.parse_args(argv)
    L = a.L or (1024 if a.quick else 4096)
    warmup = a.warmup if a.warmup is not None else 1
    repeats = a.repeats or (3 if a.quick else 5)
    torch.set_num_threads(a.threads)

    import transformers

    res = {"bench": "hf_compare", "L": L, "threads": a.threads, "warmup": warmup, "repeats": repeats,
           "torch": torch.__version__, "transformers": transformers.__version__, "tolerance": TOL,
           "target_speedup": 3.0, "results": {}}
    from transformers.utils.import_utils import is_mambapy_available

    # Mamba-1: HF's scans have no chunk size; seqlm's runs at its own default (the chunk only
    # sets how often the scan stores a state for the backward)
    m1_chunk = a.seqlm_chunk or a.chunk

    # (key, seqlm module, builder, L, repeats)
    pairs = [("mamba2", "mamba2", lambda: mamba2_pair(a.mamba2_d_state, a.chunk), L, repeats)]
    if a.seqlm_chunk and a.seqlm_chunk != a.chunk:
        # both at seqlm's default chunk (64), which is also HF's fastest chunk on this CPU
        # (see hf_chunk_sweep): the like-for-like row
        pairs.append((f"mamba2_chunk{a.seqlm_chunk}", "mamba2",
                      lambda: mamba2_pair(a.mamba2_d_state, a.seqlm_chunk), L, repeats))
        # each at its default chunk (seqlm 64, HF 256): the chunk size does not change the
        # function (the equality check covers it), only the split of work on CPU
        pairs.append((f"mamba2_seqlm_chunk{a.seqlm_chunk}_vs_hf_chunk{a.chunk}", "mamba2",
                      lambda: mamba2_pair(a.mamba2_d_state, a.seqlm_chunk, a.chunk), L, repeats))
    if is_mambapy_available():
        pairs.append(("mamba", "mamba", lambda: mamba_pair(a.mamba_d_state, m1_chunk, True), L, repeats))
    else:
        res["results"]["mamba"] = {"block": "mamba", "status": "HF mambapy path not available "
                                   "(pip install mambapy); only the sequential comparison ran"}
    # HF's default Mamba-1 fallback loops over tokens in Python and its backward is quadratic
    # in L (each step's slice of the (L, d_inner, N) tensors back-propagates a full-size
    # gradient): ~77 s per pass at L=1024 here, so it is timed at a short length only.
    pairs.append(("mamba_vs_hf_sequential", "mamba", lambda: mamba_pair(a.mamba_d_state, m1_chunk, False),
                  a.seq_L, repeats))
    for key, mod, build, Lp, reps in pairs:
        try:
            import importlib

            importlib.import_module(f"seqlm.blocks.{mod}")
        except ImportError as e:
            res["results"][key] = {"block": mod, "status": f"not available ({e})"}
            continue
        r = compare(mod, build, Lp, warmup, reps)
        name = key
        r["status"] = "ok" if r["match"] else "MISMATCH"
        res["results"][name] = r
        print(f"[{name}] diff {r['max_abs_diff_y']:.2e} grad diff {r['max_abs_diff_grad_x']:.2e} "
              f"seqlm {r['fwd_bwd_s_seqlm']:.3f}s hf {r['fwd_bwd_s_hf']:.3f}s "
              f"speedup {r['speedup']:.2f}x", file=sys.stderr, flush=True)
    if a.hf_chunk_sweep:
        res["hf_chunk_sweep"] = hf_chunk_sweep(a.mamba2_d_state, L, a.hf_chunk_sweep, warmup, min(repeats, 3))
        print(f"[hf_chunk_sweep] {res['hf_chunk_sweep']['fwd_bwd_s_hf']}", file=sys.stderr, flush=True)
    if a.profile:
        res["profile_seqlm_mamba2"] = profile_mamba2(a.mamba2_d_state, a.seqlm_chunk or a.chunk, L)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res["machine"] = machine_info(a.threads)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    ok = all(r.get("match", True) for r in res["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    __import__("seqlm.cpualloc").cpualloc.apply_entry_point()  # an entry point: allocator tuning
    sys.exit(main())
