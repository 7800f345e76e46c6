"""2-rank worker for tests/test_parallel.py: TP=2 logits and gathered gradients vs TP=1 for
every registered block and the composed stacks. Run as ``python tests/dist/tp_cases.py OUT``
under RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; rank 0 writes OUT (JSON: case -> errors)."""
import copy
import json
import os
import sys

import torch

torch.set_num_threads(1)

from seqlm import registry  # noqa: E402
from seqlm.config import RunConfig  # noqa: E402
from seqlm.io import build_model  # noqa: E402
from seqlm.parallel.engine import init_distributed, init_groups  # noqa: E402
from seqlm.parallel.tp import gather_like, shard_model  # noqa: E402

V, B, T = 37, 2, 24


def cases():
    small = {"attention": {"n_heads": 4, "n_kv_heads": 2}, "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 8},
             "mamba": {"d_state": 4, "chunk_size": 8}, "h3": {"d_state": 8, "head_dim": 2}, "mlp": {"kind": "swiglu"}}
    out = {}
    for name in registry.blocks():
        out[f"block:{name}"] = {"model": {"d_model": 32, "layers": [{"type": name, **small.get(name, {})}]}}
    out["mamba2:ngroups2+bias"] = {"model": {"d_model": 32, "layers": [
        {"type": "mamba2", "ngroups": 2, "bias": True, **small["mamba2"]}]}}
    out["mamba:bias+gelu-mlp-bias"] = {"model": {"d_model": 32, "layers": [
        {"type": "mamba", "bias": True, **small["mamba"]}, {"type": "mlp", "bias": True},
        {"type": "attention", "bias": True, "n_heads": 2}]}}
    out["gpt2-style:learned-pos+layernorm+biases"] = {"model": {
        "d_model": 32, "pattern": "*-", "pos_embedding": "learned", "max_positions": 64, "norm": "layernorm",
        "block_defaults": {"attention": {"n_heads": 4, "bias": True, "rope": False}, "mlp": {"bias": True}}}}
    out["neox-style:parallel-residual+partial-rotary"] = {"model": {
        "d_model": 32, "pattern": "*-*-", "parallel_residual": True,
        "block_defaults": {"attention": {"n_heads": 4, "rotary_dim": 4}}}}
    hybrid = {"d_model": 32, "pattern": "2-*-M-H-", "block_defaults": small}
    out["hybrid"] = {"model": hybrid}
    out["hybrid+ladder"] = {"model": {**hybrid, "residual": "ladder"}}
    out["hybrid+ladder+overlap"] = {"model": {**hybrid, "residual": "ladder"}, "overlap": True}
    out["hybrid+ladder+recursive+overlap"] = {"model": {**hybrid, "residual": "ladder", "pattern": "2-*-2-*-",
                                                        "recursive": {"groups": 4, "lora_rank": 3}}, "overlap": True}
    out["hybrid+recursive"] = {"model": {**hybrid, "pattern": "2-*-2-*-", "recursive": {"groups": 4, "lora_rank": 3}}}
    out["hybrid+hmt"] = {"model": {**hybrid, "pattern": "2-*-"},
                         "memory": {"segment_len": 8, "n_memory": 2, "n_sensory": 2, "recall": True,
                                    "recall_cache": 4, "recall_dim": 16}}
    return out


def main(path):
    init_distributed()
    tp_group, _ = init_groups(int(os.environ["WORLD_SIZE"]))
    res = {}
    for name, raw in cases().items():
        overlap = raw.pop("overlap", False)
        print("case", name, flush=True)
        cfg = RunConfig.model_validate(raw)
        torch.manual_seed(0)
        full = build_model(cfg, V)
        with torch.no_grad():  # perturb LoRA (zero B at init) so it matters
            for n, p in full.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        x = torch.randint(0, V, (B, T + 1))
        model = copy.deepcopy(full)
        ref = full(x[:, :-1])[0]
        full.loss(x[:, :-1], x[:, 1:]).backward()
        shard_model(model, tp_group, ladder_overlap=overlap)
        assert len(model.tp_overlap) == int(overlap)
        out = model(x[:, :-1])[0]
        model.loss(x[:, :-1], x[:, 1:]).backward()
        gerr = 0.0
        fulls = dict(full.named_parameters())
        for n, p in model.named_parameters():
            g = gather_like(p, p.grad, tp_group)
            gerr = max(gerr, (g - fulls[n].grad).abs().max().item() / (1e-3 + fulls[n].grad.abs().max().item()))
        nshard = sum(1 for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
        res[name] = {"logits": (out - ref).abs().max().item(), "grads": gerr, "sharded": nshard,
                     "async": sum(o.launched for o in model.tp_overlap)}
    if int(os.environ["RANK"]) == 0:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
