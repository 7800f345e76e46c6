"""Tensor parallelism (seqlm/parallel) with real 2-rank runs over gloo: TP=2 logits and
gathered gradients equal TP=1 for every registered block and for hybrid, ladder,
recursive and HMT stacks (one 2-process run, tests/dist/tp_cases.py, checked per case)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from seqlm import registry

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script, args, world=2, timeout=240, extra_env=None):
    """Start ``world`` ranks of ``script`` with the env a launcher sets; (rc, logs)."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs, rcs = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
        rcs.append(p.returncode)
    return rcs, logs


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "res.json"
    rcs, logs = run_ranks(ROOT / "tests" / "dist" / "tp_cases.py", [out])
    assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
    return json.loads(out.read_text())


CASES = [f"block:{n}" for n in registry.blocks()] + [
    "mamba2:ngroups2+bias", "mamba:bias+gelu-mlp-bias", "hybrid", "hybrid+ladder", "hybrid+recursive", "hybrid+hmt"]


@pytest.mark.parametrize("case", CASES)
def test_tp2_equals_tp1(tp_results, case):
    r = tp_results[case]
    assert r["sharded"] > 0, "nothing was sharded"
    assert r["logits"] <= 1e-5, r
    assert r["grads"] <= 1e-5, r  # gathered gradients, relative to each parameter's largest
