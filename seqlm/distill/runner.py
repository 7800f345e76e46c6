"""``distill(cfg)``: MOHAWK's stages in one run, each a call of the training loop with a
stage objective, so checkpoints, ``--resume``, logs and progress bars are the loop's own.

Run directory (``train.out_dir``):
    init/            the student before stage 1 (from the teacher, or fresh, or student_init)
    <stage name>/    one training run per stage: checkpoint/ (root), metrics.jsonl, tb/, loss.png;
                     stage k starts from stage k-1's checkpoint (train.init_from)
    report.json      the final report (also printed)
Resuming: finished stages (their checkpoint holds the final step and val_loss) are skipped,
the interrupted one continues exactly (the loop restores optimizer, RNG and data sampler
states), the later ones start from it.

Under a launcher (``deepspeed --num_gpus N -m seqlm.cli distill ...`` / torchrun) every rank
runs ``distill``: each holds the whole teacher, each stage is a DeepSpeed run (data
parallelism, ZeRO 0/1/2; seqlm/train/distributed.py), rank 0 writes init/, the configs and
the report (the others wait at barriers, then read complete files) and prints. Tensor
parallelism (distributed.tp_size > 1) runs logits stages only; a run with an orient or align
stage is refused at the start.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from seqlm.config import ConfigError, RunConfig, dump_config, parse_config
from seqlm.distill.init import init_from_teacher, student_config
from seqlm.distill.mixers import has_matrix
from seqlm.distill.objectives import OBJECTIVES, trainable_names
from seqlm.io import build_model, read_meta, save_checkpoint
from seqlm.io.checkpoint import CheckpointError, find_checkpoint
from seqlm.train.loop import autocast_dtype, estimate_loss, resolve_device, train
from seqlm.train.metrics import read_metrics


def load_teacher(path: str):
    """-> (model in eval mode, RunConfig, tokenizer) from a seqlm checkpoint (root, step or
    model-only directory) or a local Hugging Face model directory (seqlm.io.pretrained.load_any)."""
    from seqlm.io.pretrained import load_any

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"distill.teacher: no such directory {path!r}")
    return load_any(p)


def stage_names(cfg: RunConfig) -> list[str]:
    return [s.name or f"{k + 1}-{s.kind}" for k, s in enumerate(cfg.distill.stages)]


def stage_steps(stage, tc, dp: int = 1) -> int:
    """A stage's optimizer steps (``tokens`` count the whole job's: micro-batch x accum x DP ranks)."""
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (tc.batch_size * tc.seq_len * tc.grad_accum * dp)))


def plan_student(cfg: RunConfig, teacher, tcfg: RunConfig):
    """-> (student ModelConfig, paired layer indices, build_init(vocab) -> model)."""
    dc = cfg.distill
    if dc.from_teacher is not None:
        smc, pairs = student_config(tcfg.model, dc.from_teacher)

        def build():
            torch.manual_seed(cfg.train.seed)
            s = build_model(_with_model(cfg, smc), teacher.vocab_size)
            init_from_teacher(s, teacher, pairs)
            return s
        return smc, pairs, build
    smc = dc.student
    t_layers, s_layers = tcfg.model.layers or [], smc.layers or []
    pairs = []
    if len(t_layers) == len(s_layers) and smc.recursive is None and cfg.memory is None:
        pairs = [i for i, (t, s) in enumerate(zip(t_layers, s_layers)) if t.type == "attention" and s.type != "mlp"]

    def build():
        torch.manual_seed(cfg.train.seed)
        return build_model(_with_model(cfg, smc), teacher.vocab_size)
    return smc, pairs, build


def _with_model(cfg: RunConfig, smc, **train) -> RunConfig:
    data = cfg.model_dump(mode="json")
    data["model"] = smc.model_dump(mode="json")
    data["train"].update(train)
    return parse_config(data, "<distill stage config>")


def _check_pairs(cfg, tcfg, student, pairs):
    for k, st in enumerate(cfg.distill.stages):
        if st.kind == "logits":
            continue
        if getattr(tcfg, "memory", None) is not None:
            raise ConfigError(f"distill.stages[{k}].kind: {st.kind} reads the teacher layer by layer; an HMT "
                              "teacher runs segment by segment: use logits stages")
        if not pairs:
            raise ConfigError(f"distill.stages[{k}].kind: {st.kind} needs student layers paired with teacher "
                              "attention layers (from_teacher, or a student with the teacher's layer count)")
        if st.kind == "orient":
            bad = [i for i in pairs if not has_matrix(student.stack.blocks[i])]
            if bad:
                raise ConfigError(f"distill.stages[{k}].kind: orient needs a materialised mixing matrix; student "
                                  f"layer {bad[0]} is {student.stack.blocks[bad[0]].name!r}")


def _stage_done(root: Path, steps: int) -> bool:
    """The stage's newest checkpoint is its final one (last step, validated)."""
    if find_checkpoint(root) is None:
        return False
    meta = read_meta(root)
    return meta.get("step") == steps and "val_loss" in meta


def _ranks(cfg: RunConfig):
    """(rank, DP size, barrier, device): under a launcher the process group is joined here (the
    stages' DeepSpeed runs reuse it); one process: (0, 1, a no-op, train.device)."""
    from seqlm.parallel import engine as E

    if not E.launched():
        if cfg.distributed.tp_size > 1:
            raise ConfigError(f"distributed.tp_size: {cfg.distributed.tp_size} needs that many ranks; start them "
                              f"with `deepspeed --num_gpus N --module seqlm.cli distill ...` or "
                              f"`torchrun --nproc_per_node N -m seqlm.cli distill ...`")
        return 0, 1, lambda: None, resolve_device(cfg.train)
    import torch.distributed as dist

    E.init_distributed(cfg.distributed.timeout_s)
    return dist.get_rank(), dist.get_world_size() // cfg.distributed.tp_size, dist.barrier, E.device()


def distill(cfg: RunConfig, resume: bool = False, stop_at: Optional[tuple] = None) -> dict:
    """Run every stage of ``cfg.distill``; ``stop_at`` = (stage index or name, step) stops there
    with a checkpoint (continue with ``resume=True``). Returns the report (on rank 0; the other
    ranks of a launched run get ``{"rank": r, "student_checkpoint": ...}``)."""
    dc = cfg.distill
    if dc is None:
        raise ConfigError("distill: the config has no distill: section")
    sharded = [k for k, st in enumerate(dc.stages) if not OBJECTIVES[st.kind].tensor_parallel]
    if cfg.distributed.tp_size > 1 and sharded:
        k = sharded[0]
        raise ConfigError(
            f"distributed.tp_size: {cfg.distributed.tp_size}, but distill.stages[{k}] is "
            f"{dc.stages[k].kind!r}: orient and align stages run at tp_size 1 only (data parallelism, ZeRO "
            f"0/1/2), as their losses compare whole per-head attention matrices and whole block outputs, "
            f"which tensor parallelism shards across ranks; set distributed.tp_size=1 (logits stages run at any)")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rank, dp, barrier, device = _ranks(cfg)
    run = Path(cfg.train.out_dir)
    teacher, tcfg, tok = load_teacher(dc.teacher)
    if "tokenizer" in cfg.data.model_fields_set and cfg.data.tokenizer.type != tok.type:
        raise ConfigError(f"data.tokenizer.type: {cfg.data.tokenizer.type!r}, but the teacher's tokenizer is "
                          f"{tok.type!r}; distillation tokenizes the data with the teacher's tokenizer")
    smc, pairs, build = plan_student(cfg, teacher, tcfg)
    names = stage_names(cfg)
    stop_stage = None
    if stop_at is not None:
        key = str(stop_at[0])
        stop_stage = key if key in names else (names[int(key) - 1] if key.isdigit() and 1 <= int(key) <= len(names)
                                                else None)
        if stop_stage is None:
            raise ValueError(f"--stop-at: unknown stage {stop_at[0]!r}; stages: {names} (or 1..{len(names)})")
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(dump_config(cfg))

    # the student before stage 1
    init = run / "init"
    student = build()
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(f"distill.student.vocab_size: {student.vocab_size} != the teacher's {teacher.vocab_size}")
    _check_pairs(cfg, tcfg, student, pairs)
    if dc.student_init is not None:
        src = Path(dc.student_init)
        meta = read_meta(src)
        if meta.get("tokenizer_fingerprint") not in (None, tok.fingerprint()):
            raise CheckpointError(f"distill.student_init: {str(src)!r} uses another tokenizer than the teacher")
        from seqlm.io import load_weights
        load_weights(student, src)
    if rank == 0 and not (resume and find_checkpoint(init) is not None):
        save_checkpoint(init, student, _with_model(cfg, smc), tok, meta={"distill": "init", "pairs": pairs})

    from seqlm.data.dataset import load_data
    t_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dc.teacher_dtype)
    teacher.to(device=device, dtype=t_dtype or torch.float32)
    if rank == 0:  # data caches: rank 0 builds them (the others read them in the stages' runs)
        amp = autocast_dtype(cfg.train, device)
        data = load_data(cfg.data, tok, seq_len=cfg.train.seq_len)
        ecfg = _with_model(cfg, smc, batch_size=cfg.train.batch_size * dp)  # the stages' windows: global batch
        teacher_val = estimate_loss(teacher, data, ecfg, device, amp)
        init_val = estimate_loss(student.to(device), data, ecfg, device, amp)
    barrier()

    prev, stages = init, []
    for k, (st, name) in enumerate(zip(dc.stages, names)):
        steps = stage_steps(st, cfg.train, dp)
        sdir = run / name
        last = k == len(dc.stages) - 1
        scfg = _with_model(cfg, smc, max_steps=steps, lr=st.lr, min_lr=st.lr / 10 if st.min_lr is None else st.min_lr,
                           warmup_steps=st.warmup_steps, schedule=st.schedule, out_dir=str(sdir),
                           init_from=str(prev if prev is init else prev / "checkpoint"),
                           log_every=min(cfg.train.log_every, max(1, steps // 20)))  # >= 20 records a stage
        if not last:
            scfg.eval.sample_tokens = 0
        trainable = st.trainable or ("all" if st.kind == "logits" else "mixers")
        kw = dict(temperature=dc.temperature, kl_weight=dc.kl_weight, ce_weight=dc.ce_weight) if st.kind == "logits" else {}
        obj = OBJECTIVES[st.kind](teacher, pairs, trainable, t_dtype, **kw)
        ckpt = sdir / "checkpoint"
        stop = int(stop_at[1]) if stop_stage == name else None
        if resume and _stage_done(ckpt, steps):
            res = {"val_loss": read_meta(ckpt)["val_loss"], "step": steps, "resumed": "done"}
        else:
            if rank == 0:
                print(f"distill stage {k + 1}/{len(names)}: {name} ({st.kind}, {steps} steps, trains {trainable})")
                sdir.mkdir(parents=True, exist_ok=True)
                (sdir / "config.yaml").write_text(dump_config(scfg))
            barrier()
            # resume=True continues the stage's newest checkpoint, or starts it fresh (init_from)
            res = train(scfg, resume=True if resume else None, stop_at=stop, objective=obj)
            barrier()  # rank 0 has closed the stage's logs
            if res.get("stopped"):
                return {"stopped": True, "stage": name, "step": res["step"], "checkpoint": res["checkpoint"],
                        "rank": rank}
        recs = [r for r in read_metrics(sdir / "metrics.jsonl") if r.get("kind") == "train"]
        keep = set(trainable_names(student, trainable, pairs))
        n_train = sum(p.numel() for n, p in student.named_parameters() if n in keep)
        stages.append({"name": name, "kind": st.kind, "steps": steps,
                       "tokens": steps * cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum * dp,
                       "trainable": trainable if isinstance(trainable, str) else list(trainable),
                       "trainable_params": n_train,
                       "first_loss": recs[0]["loss"] if recs else None, "final_loss": recs[-1]["loss"] if recs else None,
                       "val_loss_after": res["val_loss"]})
        prev = sdir

    final = prev / "checkpoint"
    if rank != 0:
        return {"rank": rank, "student_checkpoint": str(final)}
    s_meta = read_meta(final)
    s_val = s_meta.get("val_loss")
    report = {
        "run_dir": str(run), "student_checkpoint": str(final), "pairs": pairs,
        "teacher": {"path": dc.teacher, "n_params": sum(p.numel() for p in teacher.parameters()),
                    "val_loss": teacher_val, "val_ppl": math.exp(teacher_val)},
        "student": {"n_params": s_meta.get("n_params"), "val_loss_init": init_val, "val_loss": s_val,
                    "val_ppl": math.exp(s_val) if s_val is not None else None,
                    "gap_to_teacher": None if s_val is None else s_val - teacher_val},
        "stages": stages,
        "eval": {"batches": cfg.eval.batches, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len},
        "dp_size": dp,  # ranks (launched runs; 1 in one process): stage tokens count all of them
    }
    (run / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def print_report(r: dict) -> None:
    t, s = r["teacher"], r["student"]
    print(f"teacher: {t['n_params']:,} params   val loss {t['val_loss']:.4f}   ppl {t['val_ppl']:.3f}")
    print(f"student: {s['n_params']:,} params   val loss {s['val_loss']:.4f}   ppl {s['val_ppl']:.3f}   "
          f"(gap {s['gap_to_teacher']:+.4f}; before stage 1: {s['val_loss_init']:.4f})")
    for st in r["stages"]:
        first = "-" if st["first_loss"] is None else f"{st['first_loss']:.4f}"
        fin = "-" if st["final_loss"] is None else f"{st['final_loss']:.4f}"
        print(f"  {st['name']:<12} {st['kind']:<7} {st['steps']:>6} steps  {st['trainable_params']:>10,} trained  "
              f"loss {first} -> {fin}   val loss after {st['val_loss_after']:.4f}")
    print(f"report: {Path(r['run_dir']) / 'report.json'}   student: {r['student_checkpoint']}")
