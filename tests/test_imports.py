"""Dependencies point down (shared/DESIGN.md): the model never imports train, memory, eval or io;
memory/recursive never import train. Checked in a fresh interpreter, so nothing is preloaded."""
import json
import os
import subprocess
import sys

import pytest

FORBIDDEN = {
    "seqlm.model": ["seqlm.train", "seqlm.memory", "seqlm.eval", "seqlm.io", "seqlm.recursive", "seqlm.parallel"],
    "seqlm.stack": ["seqlm.train", "seqlm.memory", "seqlm.eval", "seqlm.io", "seqlm.model", "seqlm.parallel"],
    "seqlm.memory": ["seqlm.train", "seqlm.eval", "seqlm.io"],
    "seqlm.recursive": ["seqlm.train", "seqlm.eval", "seqlm.io", "seqlm.model"],
    "seqlm.io": ["seqlm.train", "seqlm.eval", "seqlm.distill", "seqlm.parallel"],
    "seqlm.io.hf": ["seqlm.train", "seqlm.eval", "transformers"],
    "seqlm.io.pretrained": ["seqlm.train", "seqlm.eval", "transformers"],
    "seqlm": ["seqlm.io", "seqlm.model", "seqlm.train", "seqlm.eval"],
    "seqlm.config": ["seqlm.io", "seqlm.model", "seqlm.train", "seqlm.eval", "seqlm.memory"],
    "seqlm.parallel": ["seqlm.train", "seqlm.eval"],
    "seqlm.blocks.mamba2": ["seqlm.parallel", "seqlm.model", "seqlm.stack"],
    "seqlm.eval.perplexity": ["seqlm.train"],
    "seqlm.eval.cli": ["seqlm.train"],
    "seqlm.data": ["seqlm.train", "seqlm.eval", "seqlm.io", "seqlm.model", "seqlm.stack", "seqlm.memory"],
    "seqlm.data.tasks": ["seqlm.train", "seqlm.eval", "seqlm.io", "seqlm.model", "seqlm.stack", "seqlm.memory"],
    "seqlm.distill.mixers": ["seqlm.train", "seqlm.eval", "seqlm.io"],
    "seqlm.distill.init": ["seqlm.train", "seqlm.eval", "seqlm.io"],
    "seqlm.train": ["seqlm.distill"],
}


def _loaded_after_import(module: str) -> list[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_import_higher_layers(module):
    loaded = _loaded_after_import(module)
    bad = [m for m in loaded for f in FORBIDDEN[module] if m == f or m.startswith(f + ".")]
    assert not bad, f"import {module} pulled in {bad}"
