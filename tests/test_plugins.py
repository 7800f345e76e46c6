"""Blocks from outside seqlm: an installed package's ``seqlm.blocks`` entry point, and
``@register`` in a user's script, both after seqlm was imported (seqlm/registry.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typing import Literal

from seqlm import registry
from seqlm.blocks.base import Block, BlockConfig
from seqlm.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"  # a package + dist-info with entry_points.txt


def _env():
    path = os.pathsep.join([str(PLUGINS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_entry_point_block_passes_the_registry_wide_test():
    """The demo package is discovered only through its entry point (nothing imports it by name):
    the registry-wide test collects it and every check passes."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_registry_blocks.py"), "-k", "demo_shift"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", last)
    assert m and "failed" not in last and "error" not in last, last
    assert int(m.group(1)) >= 9, last  # shapes, grads, steps, prefill, contiguous, chunks x3, plan, bf16 x2


def test_entry_point_block_in_a_config_and_the_cli(tmp_path):
    """The plugin's pattern char works in a YAML config through the CLI (train a few steps)."""
    data = tmp_path / "t.txt"
    data.write_text("hello world, plugins welcome.\n" * 40)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{d_model: 16, pattern: '~-', block_defaults: {{demo_shift: {{hidden: 8}}}}}}\n"
                   f"data: {{files: ['{data}'], cache_dir: '{tmp_path / 'cache'}'}}\n"
                   f"train: {{max_steps: 2, batch_size: 2, seq_len: 16, warmup_steps: 0, out_dir: '{tmp_path / 'run'}',"
                   f" progress: false}}\neval: {{every: 0, batches: 1, sample_tokens: 4}}\n")
    r = subprocess.run([sys.executable, "-m", "seqlm.cli", "train", "--config", str(cfg)],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_register_in_a_script_after_import():
    class EchoConfig(BlockConfig):
        type: Literal["test_echo"] = "test_echo"
        scale: float = Field(1.0, gt=0, description="Output scale.")

    class Echo(Block):
        Config = EchoConfig

        def __init__(self, cfg, d_model):
            super().__init__(cfg, d_model)
            self.proj = torch.nn.Linear(d_model, d_model)

        def forward(self, x, state=None):
            return self.cfg.scale * self.proj(x), state

        def tp_plan(self):
            return {r"proj\.weight": "column"}

    with pytest.raises(ConfigError, match="model.layers"):  # not registered yet
        parse_config({"model": {"d_model": 16, "layers": [{"type": "test_echo"}]}})
    registry.register("test_echo", char="E")(Echo)
    try:
        cfg = parse_config({"model": {"d_model": 16, "pattern": "E-", "block_defaults": {"test_echo": {"scale": 2.0}}}})
        assert cfg.model.layers[0].scale == 2.0
        dumped = cfg.model_dump(mode="json")
        assert dumped["model"]["layers"][0] == {"type": "test_echo", "scale": 2.0}
        assert parse_config(dumped) == cfg  # round trip
        with pytest.raises(ConfigError, match=r"model.layers\[0\].scale"):
            parse_config({"model": {"d_model": 16, "layers": [{"type": "test_echo", "scale": -1}]}})
        from seqlm.model import LM
        lm = LM(cfg.model, vocab_size=11)
        logits, _ = lm(torch.zeros(1, 3, dtype=torch.long))
        assert logits.shape == (1, 3, 11)
    finally:
        registry.unregister("test_echo")
    assert "test_echo" not in registry.blocks() and "E" not in registry.pattern_chars()
