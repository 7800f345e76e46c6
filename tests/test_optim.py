"""Weight decay: matrices decay; norms, biases and every block's declared SSM parameters do
not (one mechanism: ``no_weight_decay`` on the module that owns them), also when relaxed
recursive sharing re-homes a block's parameters into per-depth copies."""
import pytest
import torch

from seqlm import registry
from seqlm.config import parse_config
from seqlm.model import LM
from seqlm.train.optim import param_groups

NAMES = sorted(registry.blocks())
CHAR = {name: c for c, name in registry.pattern_chars().items()}


def groups_by_name(model):
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    return {n: id(p) not in ids for n, p in model.named_parameters()}  # name -> decays


@pytest.mark.parametrize("name", NAMES)
def test_declared_names_are_parameters_of_the_block(name):
    cls = registry.get_block(name)
    blk = cls(cls.Config(), 32)
    params = dict(blk.named_parameters())
    for n in cls.no_weight_decay:
        assert n in params, f"{name}.no_weight_decay names {n!r}, which is not a parameter"


@pytest.mark.parametrize("recursive", [None, {"lora_rank": 2}])
def test_ssm_parameters_never_decay_matrices_do(recursive):
    pattern = "".join(CHAR[n] for n in NAMES)
    extra = {"recursive": {**recursive, "groups": len(pattern)}} if recursive else {}
    cfg = parse_config({"model": {"d_model": 32, "pattern": pattern, "n_layers": 2 * len(pattern),
                                  "block_defaults": {"attention": {"n_heads": 2}}, **extra}})
    model = LM(cfg.model, 17)
    decays = groups_by_name(model)
    # the SSM parameters, by their leaf names (per-depth copies are '<path with __>')
    ssm_leaf = {"A_log", "A_log_re", "A_im", "log_dt", "dt_bias", "D", "dt_proj.bias"}
    found = set()
    for n, d in decays.items():
        leaf = n.replace("__", ".").split(".")[-1]
        two = ".".join(n.replace("__", ".").split(".")[-2:])
        if leaf in ssm_leaf or two in ssm_leaf:
            found.add(leaf if leaf in ssm_leaf else two)
            assert not d, f"{n} (an SSM parameter) would get weight decay"
    assert {"A_log", "A_log_re", "A_im", "log_dt", "dt_bias", "D"} <= found
    # H3's A_im is 2-D: before the declaration it decayed (issue 15)
    assert any(n.endswith("A_im") for n in decays)
    for n, p in model.named_parameters():
        if n.endswith(("qkv_proj.weight", "out_proj.weight", "in_proj.weight", "up_proj.weight")):
            assert decays[n], f"{n} (a projection matrix) must decay"
        if p.dim() < 2:
            assert not decays[n], f"{n} (1-D) must not decay"


def test_adamw_leaves_exempt_parameters_alone():
    cfg = parse_config({"model": {"d_model": 16, "pattern": "H", "n_layers": 1}})
    model = LM(cfg.model, 11)
    blk = model.stack.blocks[0]
    before = blk.A_im.detach().clone(), blk.q_proj.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay could move a parameter
    opt.step()
    assert torch.equal(blk.A_im, before[0])
    assert not torch.equal(blk.q_proj.weight, before[1])
