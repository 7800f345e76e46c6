"""Distillation (seqlm/distill): mixing matrices, attention -> SSM initialisation, the three
MOHAWK stages through the training loop, resume, the CLI and the distilled student's I/O."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqlm.config import ConfigError, FromTeacherConfig, parse_config
from seqlm.distill.init import attention_weights, init_from_teacher, student_config
from seqlm.distill.mixers import LayerTrace, mamba2_parts, mamba_parts, mixing_matrix
from seqlm.distill.objectives import OBJECTIVES
from seqlm.distill.runner import distill
from seqlm.io import build_model, load_model
from seqlm.io.checkpoint import resolve_checkpoint
from seqlm.train.loop import train

TEXT = "".join(f"line {i % 37}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(500))
TEACHER_MODEL = {"d_model": 32, "pattern": "*-", "n_layers": 4,
                 "block_defaults": {"attention": {"n_heads": 4, "n_kv_heads": 2}}}


def base(tmp, out, **train_kw):
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    t = {"seq_len": 16, "batch_size": 4, "out_dir": str(tmp / out), "log_every": 1, "progress": False,
         "warmup_steps": 2, **train_kw}
    return {"data": {"files": [str(corpus)], "cache_dir": str(tmp / "cache")}, "train": t,
            "eval": {"every": 0, "batches": 2, "sample_tokens": 0}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = parse_config({**base(tmp, "t", max_steps=60, lr=5e-3), "model": TEACHER_MODEL})
    res = train(cfg)
    return tmp, res["checkpoint"]


def distill_cfg(tmp, teacher_ckpt, out, stages, **distill_kw):
    d = {"teacher": teacher_ckpt, "stages": stages, **distill_kw}
    d.setdefault("from_teacher", {"pattern": "2-*-"})
    return parse_config({**base(tmp, out), "distill": d})


STAGES = [{"kind": "orient", "steps": 12, "lr": 2e-2}, {"kind": "align", "steps": 12, "lr": 3e-3},
          {"kind": "logits", "steps": 12, "lr": 1e-3}]


def weights(path):
    return load_file(str(resolve_checkpoint(path) / "model.safetensors"))


def stage_losses(run, name):
    recs = [json.loads(ln) for ln in (Path(run) / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


# -- mixing matrices against the blocks' own forward --------------------------------------------
def _tiny(pattern, **defaults):
    torch.manual_seed(0)
    cfg = parse_config({"model": {"d_model": 32, "pattern": pattern, "block_defaults": defaults}})
    return build_model(cfg, 40).stack.blocks[0]


@pytest.mark.parametrize("kind", ["mamba2", "mamba2_groups", "mamba", "h3", "attention"])
def test_mixing_matrix_times_input_is_the_block_output(kind):
    u = torch.randn(2, 24, 32, dtype=torch.float64)
    if kind.startswith("mamba2"):
        blk = _tiny("2", mamba2={"d_state": 8, "head_dim": 8, "chunk_size": 8,
                                 "ngroups": 2 if kind == "mamba2_groups" else 1}).double()
        with torch.no_grad():
            blk.D.uniform_(0.5, 1.5)  # D on the diagonal of the matrix
        z, xs, _, _, _, _ = mamba2_parts(blk, u)
        y = torch.einsum("bhls,bshp->blhp", mixing_matrix(blk, u), xs)   # M x per head
        out = blk._out(y.reshape(2, 24, -1), z)                           # gate + norm + out_proj as in the block
    elif kind == "mamba":
        blk = _tiny("M", mamba={"d_state": 4}).double()
        xc, z, *_ = mamba_parts(blk, u)
        y = torch.einsum("bdls,bsd->bld", mixing_matrix(blk, u), xc)
        out = blk.out_proj(y * torch.nn.functional.silu(z))
    elif kind == "h3":
        blk = _tiny("H", h3={"d_state": 4, "head_dim": 4}).double()
        with torch.no_grad():
            blk.D.uniform_(0.5, 1.5)
        v = blk.v_proj(u).view(2, 24, blk.H, blk.P)
        y = torch.einsum("bhtu,buhj->bthj", mixing_matrix(blk, u), v)
        out = blk.out_proj(y.reshape(2, 24, -1))
    else:
        blk = _tiny("*", attention={"n_heads": 4, "n_kv_heads": 2}).double()
        _, _, v = blk._qkv(u, 0)
        v = v.repeat_interleave(2, 1)
        y = (mixing_matrix(blk, u) @ v).transpose(1, 2).reshape(2, 24, -1)
        out = blk.out_proj(y)
    ref, _ = blk(u)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)


# -- initialisation ----------------------------------------------------------------------------
def _teacher_and_student(pattern, **bd):
    torch.manual_seed(1)
    tcfg = parse_config({"model": TEACHER_MODEL})
    t = build_model(tcfg, 40)
    smc, pairs = student_config(tcfg.model, FromTeacherConfig(pattern=pattern, block_defaults=bd))
    s = build_model(parse_config({"model": smc.model_dump()}), 40)
    init_from_teacher(s, t, pairs)
    return t, s, smc, pairs


def test_attention_to_mamba2_init_copies_what_it_claims_with_gqa():
    t, s, smc, pairs = _teacher_and_student("2-*-", mamba2={"chunk_size": 8})
    assert pairs == [0] and [l.type for l in smc.layers] == ["mamba2", "mlp", "attention", "mlp"]
    m, a = s.stack.blocks[0], t.stack.blocks[0]
    assert (m.H, m.P, m.N, m.G, m.d_inner) == (4, 8, 8, 4, 32)    # heads = query heads, one group each
    assert m.cfg.chunk_size == 8
    W = a.qkv_proj.weight                                         # rows [q (4x8) | k (2x8) | v (2x8)]
    Wk = W[32:48].view(2, 8, 32)
    Wv = W[48:64].view(2, 8, 32)
    Wi = m.in_proj.weight                                         # rows [z | x | B | C | dt]
    for h in range(4):                                            # head h reads kv head h // 2
        assert torch.equal(Wi[32 + 8 * h:40 + 8 * h], Wv[h // 2])   # x <- W_v
        assert torch.equal(Wi[64 + 8 * h:72 + 8 * h], Wk[h // 2])   # B <- W_k
        assert torch.equal(Wi[96 + 8 * h:104 + 8 * h], W[8 * h:8 * h + 8])  # C <- W_q
    assert Wi.shape == (32 + 32 + 2 * 32 + 4, 32)
    assert torch.equal(m.out_proj.weight, a.out_proj.weight)
    assert torch.equal(m.conv_weight[:, -1], torch.ones(64 + 32)) and not m.conv_weight[:, :-1].any()
    # everything outside the converted layer is the teacher's
    ts = t.state_dict()
    for k, v in s.state_dict().items():
        if not k.startswith("stack.blocks.0."):
            assert torch.equal(v, ts[k]), k
    # the mapping at work: with an identity conv, B and C are SiLU of the teacher's k and q
    u = torch.randn(1, 5, 32)
    _, xs, B, C, _, _ = mamba2_parts(m, u)
    torch.testing.assert_close(xs, torch.nn.functional.silu(u @ attention_weights(a)[2].t()).view(1, 5, 4, 8))


def test_attention_to_mamba_and_h3_init():
    torch.manual_seed(2)
    tcfg = parse_config({"model": {**TEACHER_MODEL, "block_defaults": {"attention": {"n_heads": 4}}}})
    t = build_model(tcfg, 40)
    for pattern in ("M-", "H-"):
        smc, pairs = student_config(tcfg.model, FromTeacherConfig(pattern=pattern))
        s = build_model(parse_config({"model": smc.model_dump()}), 40)
        init_from_teacher(s, t, pairs)
        assert pairs == [0, 2]
        for i in pairs:
            m, a = s.stack.blocks[i], t.stack.blocks[i]
            Wq, Wk, Wv, *_ = attention_weights(a)
            assert torch.equal(m.out_proj.weight, a.out_proj.weight)
            if pattern == "M-":
                assert (m.d_inner, m.N) == (32, 8)
                assert torch.equal(m.in_proj.weight[:32], Wv)
                WB, WC = m.x_proj.weight[m.R:m.R + 8], m.x_proj.weight[m.R + 8:]
                # least squares through the value projection: exact for an invertible W_v
                torch.testing.assert_close(WB @ Wv, Wk.view(4, 8, 32).mean(0), atol=1e-4, rtol=1e-3)
                torch.testing.assert_close(WC @ Wv, Wq.view(4, 8, 32).mean(0), atol=1e-4, rtol=1e-3)
            else:
                assert m.P == 8
                for lin, W in ((m.q_proj, Wq), (m.k_proj, Wk), (m.v_proj, Wv)):
                    assert torch.equal(lin.weight, W)
                assert torch.equal(m.shift_weight[:, -1], torch.ones(32)) and not m.shift_weight[:, :-1].any()


def test_data_tokenizer_must_be_the_teachers(teacher, tmp_path):
    tmp, ckpt = teacher
    d = {**base(tmp_path, "tk"), "distill": {"teacher": ckpt, "from_teacher": {"pattern": "2-"},
                                              "stages": [{"kind": "logits", "steps": 1}]}}
    d["data"]["tokenizer"] = {"type": "byte"}
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.type: 'byte'.*teacher's tokenizer is 'char'"):
        distill(parse_config(d))
    d["distill"]["teacher"] = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="distill.teacher: no such directory"):
        distill(parse_config(d))


def test_student_config_errors_name_the_field():
    tcfg = parse_config({"model": TEACHER_MODEL})
    with pytest.raises(ConfigError, match=r"pattern\[1\].*'mlp'"):
        student_config(tcfg.model, FromTeacherConfig(pattern="22"))
    with pytest.raises(ConfigError, match=r"block_defaults\.mamba2\.d_state: fixed"):
        student_config(tcfg.model, FromTeacherConfig(pattern="2-", block_defaults={"mamba2": {"d_state": 4}}))
    with pytest.raises(ConfigError, match="multiple of len"):
        student_config(tcfg.model, FromTeacherConfig(pattern="2-*"))
    with pytest.raises(ConfigError, match="from_teacher: give exactly one"):
        parse_config({"distill": {"teacher": "x", "stages": [{"kind": "logits", "steps": 1}]}})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.steps"):
        parse_config({"distill": {"teacher": "x", "from_teacher": {"pattern": "2-"},
                                  "stages": [{"kind": "logits", "steps": 1, "tokens": 5}]}})


# -- the stages ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mohawk(teacher):
    tmp, ckpt = teacher
    cfg = distill_cfg(tmp, ckpt, "d", STAGES, kl_weight=1.0, ce_weight=0.0)
    return tmp, ckpt, cfg, distill(cfg)


def test_each_stage_lowers_its_loss_and_report(mohawk):
    tmp, ckpt, cfg, rep = mohawk
    run = tmp / "d"
    teacher_model, _, tok = load_model(ckpt)
    start = run / "init"
    ids = torch.tensor(tok.encode(TEXT[-3000:]))                 # fixed windows of real text
    xs = [torch.stack([ids[o + 16 * j:o + 16 * j + 16] for j in range(8)]) for o in (0, 700, 1400)]
    for name, kind in (("1-orient", "orient"), ("2-align", "align"), ("3-logits", "logits")):
        assert len(stage_losses(run, name)) == 12
        end = run / name / "checkpoint"
        obj = OBJECTIVES[kind](teacher_model, rep["pairs"], "all")
        before, after = (load_model(c)[0] for c in (start, end))
        obj.setup(before, "cpu")
        with torch.no_grad():   # the stage's own loss on the same fixed batches, before vs after
            lb = sum(obj.loss(before, x, None).item() for x in xs)
            la = sum(obj.loss(after, x, None).item() for x in xs)
        assert la < (0.97 if kind == "logits" else 0.9) * lb, (name, lb, la)
        start = end
    saved = json.loads((run / "report.json").read_text())
    assert saved["stages"][2]["final_loss"] == rep["stages"][2]["final_loss"]
    assert [s["name"] for s in rep["stages"]] == ["1-orient", "2-align", "3-logits"]
    assert rep["teacher"]["n_params"] > 0 and rep["student"]["n_params"] > 0
    assert math.isclose(rep["student"]["val_ppl"], math.exp(rep["student"]["val_loss"]))
    assert rep["stages"][0]["trainable_params"] < rep["stages"][2]["trainable_params"]
    # the distilled hybrid is closer to the teacher than where it started
    assert rep["student"]["val_loss"] < rep["student"]["val_loss_init"]


def test_stage2_keeps_frozen_parameters_bit_identical(mohawk):
    tmp, _, _, _ = mohawk
    run = tmp / "d"
    init = weights(run / "init")
    s1, s2, s3 = (weights(run / name / "checkpoint") for name in ("1-orient", "2-align", "3-logits"))
    changed = []
    for k in s2:
        if k.startswith("stack.blocks.0."):                 # the converted mixer trains
            changed.append(not torch.equal(s1[k], s2[k]))
        else:                                               # MLPs, norms, embedding, head, kept attention
            assert torch.equal(s1[k], s2[k]), k
            assert torch.equal(init[k], s1[k]), k
    assert any(changed)
    assert not torch.equal(s2["embed.weight"], s3["embed.weight"])   # stage 3 trains everything


def test_resume_in_the_middle_of_stage2_continues_exactly(mohawk):
    tmp, ckpt, _, rep = mohawk
    cfg = distill_cfg(tmp, ckpt, "r", STAGES, kl_weight=1.0, ce_weight=0.0)
    stopped = distill(cfg, stop_at=("2-align", 5))
    assert stopped["stopped"] and stopped["step"] == 5
    rep2 = distill(cfg, resume=True)
    for name in ("1-orient", "2-align", "3-logits"):
        assert stage_losses(tmp / "r", name) == stage_losses(tmp / "d", name), name
    a, b = (weights(tmp / run / "3-logits" / "checkpoint") for run in ("d", "r"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert rep2["student"]["val_loss"] == rep["student"]["val_loss"]


def test_distilled_student_loads_evaluates_and_generates_with_caches(mohawk, capsys):
    from seqlm.cli import main

    tmp, _, _, rep = mohawk
    final = rep["student_checkpoint"]
    model, cfg, tok = load_model(final)
    assert [l.type for l in cfg.model.layers] == ["mamba2", "mlp", "attention", "mlp"]
    assert main(["eval", "ppl", "--checkpoint", final, "--data", str(tmp / "corpus.txt"), "--context", "16",
                 "--max-chars", "400", "--out", str(tmp / "ev"), "--quiet"]) == 0
    res = json.loads((tmp / "ev" / "ppl.json").read_text())
    assert res["contexts"]["16"]["ppl"] == pytest.approx(math.exp(res["contexts"]["16"]["loss"]))
    assert res["contexts"]["16"]["loss"] < 2.5   # learned something (uniform over the vocab: ~3.6)
    capsys.readouterr()
    prompt = torch.tensor(tok.encode("line 3: the"))
    out = model.generate(prompt, 12, temperature=0)                  # prefill + cached steps
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(12):                                          # no cache: full forward each token
            ids = torch.cat([ids, model(ids[None])[0][0, -1].argmax()[None]])
    assert torch.equal(out, ids[len(prompt):])


def test_logit_only_distillation_between_two_seqlm_models_via_cli(teacher, tmp_path, capsys):
    import yaml

    from seqlm.cli import main

    tmp, ckpt = teacher
    d = base(tmp_path, "lo")
    d["distill"] = {"teacher": ckpt, "student": {"d_model": 24, "pattern": "2", "n_layers": 2,
                                                 "block_defaults": {"mamba2": {"d_state": 8, "head_dim": 12,
                                                                               "chunk_size": 8}}},
                    "stages": [{"kind": "logits", "steps": 15, "lr": 1e-2}], "temperature": 2.0}
    path = tmp_path / "lo.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["distill", "-c", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "lo" / "report.json").read_text())
    assert json.loads(out[out.index("{\n"):]) == rep
    ls = stage_losses(tmp_path / "lo", "1-logits")
    assert sum(ls[-3:]) < 0.9 * sum(ls[:3])
    assert rep["student"]["n_params"] < rep["teacher"]["n_params"]
    # errors: one line naming the field, non-zero exit
    d["distill"]["stages"] = [{"kind": "orient", "steps": 2}]
    d["distill"]["student"]["n_layers"] = 2
    path.write_text(yaml.safe_dump(d))
    assert main(["distill", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqlm:") and "distill.stages[0].kind" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "distill").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_distill_presets_load(path):
    from seqlm.config import load_config

    cfg = load_config(path)
    assert cfg.distill is not None and cfg.distill.stages


@pytest.mark.parametrize("topology", ["memory", "recursive"])
def test_logit_distillation_into_hmt_and_recursive_students(teacher, tmp_path, topology):
    tmp, ckpt = teacher
    d = base(tmp_path, "s")
    student = {"d_model": 32, "pattern": "2-", "n_layers": 4,
               "block_defaults": {"mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 8}}}
    if topology == "recursive":
        student["recursive"] = {"groups": 2, "lora_rank": 2}
    else:
        d["memory"] = {"segment_len": 8, "n_sensory": 2}
    d["distill"] = {"teacher": ckpt, "student": student, "stages": [{"kind": "logits", "steps": 4, "lr": 1e-2}]}
    rep = distill(parse_config(d))
    model, cfg, _ = load_model(rep["student_checkpoint"])
    assert (cfg.memory is not None) == (topology == "memory")
    assert (cfg.model.recursive is not None) == (topology == "recursive")
    assert rep["student"]["val_loss"] < rep["student"]["val_loss_init"]


def test_distillation_from_a_tiny_hugging_face_llama_directory(tmp_path):
    """A local transformers Llama (GQA, RoPE, SwiGLU; built here, HF_HUB_OFFLINE=1) as the teacher:
    its tokenizer tokenizes the data, its attention layers become Mamba-2, all three stages run."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import TEXT as HF_TEXT, build_hf, build_tokenizer

    hf = tmp_path / "llama"
    hf.mkdir()
    build_hf("llama", hf, build_tokenizer())
    (tmp_path / "corpus.txt").write_text(HF_TEXT * 10)
    d = base(tmp_path, "hf")
    d["distill"] = {"teacher": str(hf), "from_teacher": {"pattern": "2-", "block_defaults": {"mamba2": {"chunk_size": 8}}},
                    "stages": [{"kind": "orient", "steps": 3}, {"kind": "align", "steps": 3},
                               {"kind": "logits", "steps": 3}]}
    rep = distill(parse_config(d))
    model, cfg, tok = load_model(rep["student_checkpoint"])
    assert tok.type == "hf" and model.vocab_size == 320
    assert [l.type for l in cfg.model.layers] == ["mamba2", "mlp", "mamba2", "mlp"]
    assert rep["pairs"] == [0, 2]
    assert math.isfinite(rep["student"]["val_loss"]) and rep["teacher"]["n_params"] > 0
    ids = torch.tensor(tok.encode("The quick brown"))
    assert model.generate(ids, 5, temperature=0).shape == (5,)


# -- under a launcher: 2 DP ranks (gloo, 1 thread each), ZeRO 2, against one process ------------
DP_STAGES = [{"kind": "orient", "steps": 4, "lr": 2e-2}, {"kind": "align", "steps": 4, "lr": 3e-3},
             {"kind": "logits", "steps": 4, "lr": 1e-3}]
NAMES = ("1-orient", "2-align", "3-logits")


def _launch(launcher, args, cwd):
    import os
    import subprocess
    import sys

    from test_parallel import ROOT, free_port

    bin_ = Path(sys.executable).parent
    head = ([str(bin_ / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
            if launcher == "deepspeed" else
            [str(bin_ / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m"])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([*head, "seqlm.cli", "distill", *map(str, args)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def dp_runs(teacher):
    """One process at batch 4 (fp32 pinned) and `deepspeed --num_gpus 2 --module seqlm.cli distill`
    at 2 ranks x batch 2, ZeRO 2: the same global batch."""
    import yaml

    tmp, ckpt = teacher
    d = {**base(tmp, "dp_ref", dtype="fp32"),
         "distill": {"teacher": ckpt, "from_teacher": {"pattern": "2-*-"}, "stages": DP_STAGES}}
    ref = distill(parse_config(d))
    path = tmp / "dp.yaml"
    path.write_text(yaml.safe_dump(d))
    out = _launch("deepspeed", ["-c", path, "--json", f"train.out_dir={tmp / 'dp'}", "train.batch_size=2",
                                "distributed.zero_stage=2"], tmp)
    return tmp, path, ref, out


def _same_report(ref, rep, tol=1e-4):
    """Same structure; numbers within tol; paths, the micro-batch and the rank count may differ."""
    if isinstance(ref, dict):
        assert ref.keys() == rep.keys()
        for k in ref:
            if k not in ("run_dir", "student_checkpoint", "batch_size", "dp_size"):
                _same_report(ref[k], rep[k], tol)
    elif isinstance(ref, list):
        assert len(ref) == len(rep)
        for a, b in zip(ref, rep):
            _same_report(a, b, tol)
    elif isinstance(ref, float):
        assert abs(ref - rep) <= tol, (ref, rep)
    else:
        assert ref == rep


def test_dp2_zero2_distill_matches_one_process_same_global_batch(dp_runs):
    tmp, _, ref, out = dp_runs
    for name in NAMES:   # every stage's loss curve
        a, b = stage_losses(tmp / "dp_ref", name), stage_losses(tmp / "dp", name)
        assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (name, a, b)
        conf = json.loads((tmp / "dp" / name / "deepspeed_config.json").read_text())
        assert conf["zero_optimization"]["stage"] == 2 and conf["train_batch_size"] == 4
        wa, wb = (weights(tmp / run / name / "checkpoint") for run in ("dp_ref", "dp"))
        for k in wa:     # the consolidated weights after each stage (parameters the loss never reads too)
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=f"{name}: {k}")
    rep = json.loads((tmp / "dp" / "report.json").read_text())
    _same_report(ref, rep)   # val losses too: rank-split validation at the global batch
    assert rep["dp_size"] == 2 and ref["dp_size"] == 1 and rep["stages"][0]["tokens"] == 4 * 4 * 16
    # rank 0 alone prints: one report, one JSON
    assert out.count("teacher:") == 1 and json.JSONDecoder().raw_decode(out[out.index("{\n"):])[0] == rep


def test_dp2_zero2_stage2_keeps_frozen_parameters_bit_identical(dp_runs):
    tmp = dp_runs[0]
    run = tmp / "dp"
    init = weights(run / "init")
    s1, s2 = (weights(run / name / "checkpoint") for name in NAMES[:2])
    changed = []
    for k in s2:
        if k.startswith("stack.blocks.0."):                 # the converted mixer trains
            changed.append(not torch.equal(s1[k], s2[k]))
        else:                                               # MLPs, norms, embedding, head, kept attention
            assert torch.equal(s1[k], s2[k]) and torch.equal(init[k], s1[k]), k
    assert sum(changed) >= 5
    # ZeRO's optimizer partitions hold the mixer's parameters only (padding aside), split over 2 ranks
    from seqlm.parallel.engine import safe_load

    mixer = sum(v.numel() for k, v in s2.items() if k.startswith("stack.blocks.0."))
    parts = [safe_load(f) for f in sorted((run / "2-align" / "ds_checkpoint" / "step4").glob("zero_pp_rank_*"))]
    held = sum(t.numel() for p in parts for t in p["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert len(parts) == 2 and mixer <= held < mixer + 64, (mixer, held)


def test_dp2_stop_in_stage2_and_resume_continues_exactly(dp_runs):
    """torchrun -m seqlm.cli distill: stop in stage 2, then --resume (stage 1 skipped, stage 2
    from DeepSpeed's checkpoint, stage 3 after it): the losses of the uninterrupted run."""
    tmp, path, _, _ = dp_runs
    args = ["-c", path, f"train.out_dir={tmp / 'dpr'}", "train.batch_size=2", "distributed.zero_stage=2"]
    out = _launch("torchrun", [*args, "--stop-at", "2-align:2"], tmp)
    assert out.count("stopped in stage 2-align at step 2") == 1
    _launch("torchrun", [*args, "--resume"], tmp)
    for name in NAMES:
        a, b = stage_losses(tmp / "dp", name), stage_losses(tmp / "dpr", name)
        assert len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (name, a, b)
    wa, wb = (weights(tmp / run / "3-logits" / "checkpoint") for run in ("dp", "dpr"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def test_distill_refuses_tensor_parallelism_for_orient_and_align_naming_the_field(teacher, tmp_path, capsys):
    import yaml

    from seqlm.cli import main

    tmp, ckpt = teacher
    d = {**base(tmp_path, "tp"), "distill": {"teacher": ckpt, "from_teacher": {"pattern": "2-*-"},
                                              "stages": [{"kind": "logits", "steps": 1}, *DP_STAGES[1:]]}}
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump(d))
    for launched in (False, True):   # the check comes before any rank joins a group or writes a file
        env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"} if launched else {}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert main(["distill", "-c", str(path), "distributed.tp_size=2"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("seqlm:"), err
        assert "distributed.tp_size: 2" in err and "distill.stages[1] is 'align'" in err and "shards" in err, err
        assert not (tmp_path / "tp").exists()
    # logits stages alone pass that check; without a launcher, TP needs its ranks
    assert main(["distill", "-c", str(path), "distributed.tp_size=2", "distill.stages=[{kind: logits, steps: 1}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "distributed.tp_size: 2 needs that many ranks" in err, err
    assert not (tmp_path / "tp").exists()


def test_tp2_logit_distillation_matches_one_process(teacher, tmp_path):
    """Logits stages read only the (full) logits, so they run on a tensor-parallel student:
    `torchrun -m seqlm.cli distill` at tp_size 2 (attention, Mamba-2 and MLP layers sharded)
    follows one process (fp32)."""
    import yaml

    tmp, ckpt = teacher
    student = {"d_model": 32, "pattern": "2-*-", "n_layers": 4,
               "block_defaults": {"mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 8},
                                  "attention": {"n_heads": 4, "n_kv_heads": 2}}}
    d = {**base(tmp_path, "ref", dtype="fp32"),
         "distill": {"teacher": ckpt, "student": student, "temperature": 2.0, "ce_weight": 0.5,
                     "stages": [{"kind": "logits", "steps": 5, "lr": 1e-2}]}}
    ref = distill(parse_config(d))
    path = tmp_path / "l.yaml"
    path.write_text(yaml.safe_dump(d))
    _launch("torchrun", ["-c", path, f"train.out_dir={tmp_path / 'tp'}", "distributed.tp_size=2"], tmp_path)
    a, b = stage_losses(tmp_path / "ref", "1-logits"), stage_losses(tmp_path / "tp", "1-logits")
    assert len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
    wa, wb = (weights(tmp_path / run / "1-logits" / "checkpoint") for run in ("ref", "tp"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4, msg=k)
    rep = json.loads((tmp_path / "tp" / "report.json").read_text())
    _same_report(ref, rep)
    assert json.loads((tmp_path / "tp" / "1-logits" / "deepspeed_config.json").read_text())["train_batch_size"] == 4
