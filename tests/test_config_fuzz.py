"""Property-based fuzz of the config loader (hypothesis): random YAML documents, random
values in real fields and random dotted overrides. Every outcome is a valid RunConfig (which
round-trips) or one ConfigError naming the field / file / override - never another exception."""
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from seqlm.config import ConfigError, RunConfig, dump_config, load_config, parse_config

FUZZ = settings(max_examples=int(os.environ.get("SEQLM_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BASE = {"model": {"d_model": 32, "pattern": "*-", "block_defaults": {"attention": {"n_heads": 2}}},
        "data": {"files": ["corpus.txt"]}, "train": {"max_steps": 3}}


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        out.append(prefix + name)
        ann = f.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                out += _fields(cand, prefix + name + ".")
    return out


FIELDS = _fields(RunConfig)
NAMES = sorted({p.split(".")[-1] for p in FIELDS} | {"model", "data", "train", "eval", "memory", "layers",
                                                     "type", "attention", "mamba2", "mamba", "h3", "mlp"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["*-", "M2H*-", "auto", "bf16", "cosine", "char", "hmt", "", "null"]))
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def check(fn) -> Any:
    """Run the loader; a valid config must round-trip, an error must be a ConfigError whose
    every line names where (``field: reason``, the file, or the override)."""
    try:
        cfg = fn()
    except ConfigError as e:
        msg = str(e)
        assert msg and "Traceback" not in msg
        lines = msg.splitlines()
        head = lines[0]
        assert head.startswith(("invalid config", "config file", "override", "<")), msg
        assert head.startswith("invalid config") or len(lines) == 1, msg
        for ln in lines[1:]:
            where, sep, why = ln.partition(": ")
            assert sep and where and why, msg
        return e
    assert isinstance(cfg, RunConfig)
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg
    return cfg


def _load_text(text: str | bytes, overrides=()):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return check(lambda: load_config(p, list(overrides)))


@FUZZ
@given(st.one_of(st.dictionaries(keys, values, max_size=6), values))
def test_random_yaml_documents(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    _load_text(text)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_random_bytes_and_text(raw):
    _load_text(raw)


@FUZZ
@given(st.sampled_from(FIELDS), values)
def test_random_values_in_real_fields(field, value):
    import copy

    data = copy.deepcopy(BASE)
    node, parts = data, field.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value
    out = check(lambda: parse_config(data, "<fuzz>"))
    if isinstance(out, ConfigError):  # the error names the mutated field's section
        assert parts[0] in str(out) or "<fuzz>: top level" in str(out), (field, str(out))


ov_key = st.lists(st.one_of(st.sampled_from(NAMES), st.text(min_size=0, max_size=5),
                            st.builds(lambda n, i: f"{n}[{i}]", st.sampled_from(NAMES), st.integers(0, 20))),
                  min_size=1, max_size=4).map(".".join)
ov_val = st.one_of(st.text(max_size=15), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))


@FUZZ
@given(st.lists(st.one_of(st.tuples(ov_key, ov_val).map("=".join), st.text(max_size=10)), max_size=4))
def test_random_dotted_overrides(overrides):
    _load_text(yaml.safe_dump(BASE), overrides)


def test_non_utf8_config_names_the_file(tmp_path):
    """Defect 8: a non-UTF-8 YAML config gave a UnicodeDecodeError without the file name."""
    p = tmp_path / "latin1.yaml"
    p.write_bytes("model: {pattern: '*-'}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml.*not UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"cannot be read|not found"):
        load_config(tmp_path)


def test_known_tricky_inputs():
    for text in ("model: {n_layers: 100000000000000000000, pattern: '*'}", "model: {d_model: .nan}",
                 "train: {lr: .inf}", "[1, 2]", "model: &a {layers: [*a]}", "!!python/object:os.system {}"):
        _load_text(text)
    for ov in ("data.files[0].x=1", "data.files[0]=[1]", "model.d_model.x=1", "train=3", "model=", "a.b[0]=1",
               "model.block_defaults.attention.n_heads=0", "x" * 60 + "=1", "=1", "model..x=1"):
        _load_text(yaml.safe_dump(BASE), [ov])
    assert math.isinf(_load_text("train: {lr: .inf}").train.lr) if isinstance(
        _load_text("train: {lr: .inf}"), RunConfig) else True
