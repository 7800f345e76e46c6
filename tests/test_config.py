"""Configs: invalid values fail at load naming the field; round-trip; overrides; patterns."""
from pathlib import Path

import pytest
import yaml

from seqlm.config import ConfigError, RunConfig, dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def base(**model):
    m = {"d_model": 64, "pattern": "*-"}
    m.update(model)
    return {"model": m}


INVALID = [
    # (config dict, substring the error must contain)
    (base(d_model=96, pattern=None, layers=[{"type": "mlp"}, {"type": "mlp"}, {"type": "mlp"},
                                             {"type": "attention", "n_heads": 5}]),
     "model.layers[3].n_heads: must divide d_model=96"),
    (base(d_model=0), "model.d_model"),
    (base(pattern="*x-"), "model.pattern[1]: unknown character 'x'"),
    (base(pattern="*-", n_layers=3), "model.n_layers: 3 is not a multiple of len(pattern)=2"),
    (base(pattern=None), "model.layers: give `layers`"),
    (base(layers=[{"type": "mlp"}]), "model.pattern: give either"),
    (base(pattern=None, layers=[{"type": "nope"}]), "model.layers[0]"),
    (base(pattern=None, layers=[{"type": "mlp", "hidden": -4}]), "model.layers[0].hidden"),
    (base(pattern=None, layers=[{"type": "mlp", "colour": 1}]), "model.layers[0].colour"),
    (base(pattern=None, layers=[{"type": "attention", "n_heads": 4, "n_kv_heads": 3}]),
     "model.layers[0].n_kv_heads: must divide n_heads=4"),
    (base(block_defaults={"attenshun": {}}), "model.block_defaults.attenshun: unknown block type"),
    (base(norm="batchnorm"), "model.norm"),
    ({**base(), "train": {"lr": -1}}, "train.lr"),
    ({**base(), "train": {"schedule": "linear"}}, "train.schedule"),
    ({**base(), "train": {"batch_size": 0}}, "train.batch_size"),
    ({**base(), "data": {"files": []}}, "data.files: must list at least one file"),
    ({**base(), "data": {"tokenizer": {"type": "sentencepiece"}}}, "data.tokenizer.path: required"),
    ({**base(), "data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({**base(), "trian": {}}, "trian"),
    ({**base(), "eval": {"top_p": 2.0}}, "eval.top_p"),
]


@pytest.mark.parametrize("data,needle", INVALID, ids=[n for _, n in INVALID])
def test_invalid_config_names_field(data, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert needle in str(ei.value), str(ei.value)


def test_round_trip_all_presets():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets, "no presets shipped"
    for p in presets:
        cfg = load_config(p)
        again = parse_config(yaml.safe_load(dump_config(cfg)))
        assert again == cfg, p.name
        assert dump_config(again) == dump_config(cfg)


def test_pattern_expands_and_tiles():
    cfg = parse_config(base(pattern="*-", n_layers=6, block_defaults={"attention": {"n_heads": 8}}))
    types = [spec.type for spec in cfg.model.layers]
    assert types == ["attention", "mlp"] * 3
    assert cfg.model.layers[0].n_heads == 8 and cfg.model.pattern is None and cfg.model.n_layers == 6


def test_list_layer_fields_win_over_block_defaults():
    cfg = parse_config(base(pattern=None, block_defaults={"attention": {"n_heads": 8}},
                            layers=[{"type": "attention", "n_heads": 2}, {"type": "attention"}]))
    assert [s.n_heads for s in cfg.model.layers] == [2, 8]


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base()))
    cfg = load_config(p, ["train.lr=3e-4", "model.d_model=128", "model.pattern=*", "eval.top_k=null"])
    assert cfg.train.lr == 3e-4 and cfg.model.d_model == 128
    assert [s.type for s in cfg.model.layers] == ["attention"] and cfg.eval.top_k is None
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p, ["train.lr=fast"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(lst)


def test_defaults_valid():
    assert isinstance(RunConfig(), RunConfig)
