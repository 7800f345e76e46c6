"""N-rank worker (TP=N): load consolidated seqlm checkpoints at TP=world, write their logits on
fixed tokens (rank 0): ``python tests/dist/ckpt_logits.py OUT.json CKPT [CKPT ...]``."""
import json
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from seqlm.io import load_model  # noqa: E402
from seqlm.parallel.engine import init_distributed, init_groups  # noqa: E402
from seqlm.parallel.tp import shard_model  # noqa: E402


def main(out, ckpts):
    init_distributed()
    tp_group, _ = init_groups(int(os.environ["WORLD_SIZE"]))
    res = {}
    for ck in ckpts:
        model, _, tok = load_model(ck)
        shard_model(model, tp_group)
        x = torch.arange(40).remainder(tok.vocab_size).view(2, 20)
        with torch.no_grad():
            res[ck] = model(x)[0].tolist()
    if int(os.environ["RANK"]) == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()  # leave together: a rank tearing down gloo while a peer still exits can abort it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
