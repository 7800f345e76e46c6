"""Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023): the data generator.
(Scoring and evaluation of checkpoints: seqlm/eval/tasks/mqar.py.)

One example of length L with k key/value pairs over a vocabulary V:

    position  0 .. 2k-1      k1 v1 k2 v2 ... kk vk        (the "context")
    position  2k .. L-1      each key once more, at gap g_i (an even offset into the query
                             region) drawn without replacement from a power law
                             p(g) ∝ a·(g+1)^(a-1), a = 0.01; every other slot is filler
                             (random tokens from [0, V) as Zoology does, or 0 = pad)

Keys come from [1, V/2) and values from [V/2, V), each without replacement inside an
example. ``labels[t]`` is the target of the prediction made at input position t (the model
sees ``inputs[:t+1]``): at the position of a queried key it is that key's value, everywhere
else it is -100. So exactly k labels per example. Accuracy is the argmax accuracy over the
labelled positions (:func:`mqar_accuracy`).

Standard settings (Zoology): V = 8192; (L, k) ∈ (64,4), (128,8), (256,16), (512,64).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

IGNORE = -100
STANDARD_SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))
STANDARD_VOCAB = 8192


@dataclass(frozen=True)
class MQARSpec:
    """One MQAR setting."""

    seq_len: int = 64
    num_pairs: int = 4
    vocab_size: int = STANDARD_VOCAB
    power_a: float = 0.01
    random_fill: bool = True  # filler tokens random in [0, V) (Zoology) or 0 (pad)

    def check(self) -> None:
        L, k, V = self.seq_len, self.num_pairs, self.vocab_size
        if k < 1:
            raise ValueError(f"num_pairs: must be >= 1, got {k}")
        if L % 2:
            raise ValueError(f"seq_len: must be even, got {L}")
        if 4 * k > L:
            raise ValueError(f"num_pairs: 4 * num_pairs must be <= seq_len={L}, got num_pairs={k}")
        if V // 2 - 1 < k or V - V // 2 < k:
            raise ValueError(f"vocab_size: {V} too small for {k} distinct keys and values")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a: must be in (0, 1], got {self.power_a}")

    def to_dict(self) -> dict:
        return asdict(self)


def _sample_distinct(n: int, k: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) integers from [lo, hi), distinct within each row (uniform without replacement)."""
    w = torch.ones(hi - lo).expand(n, hi - lo)
    return torch.multinomial(w, k, replacement=False, generator=gen) + lo


def gap_probs(space: int, power_a: float) -> torch.Tensor:
    """p(g) ∝ a·(g+1)^(a-1) for g in [0, space): the power law over query slots."""
    i = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


def make_mqar(num_examples: int, spec: MQARSpec = MQARSpec(), seed: int = 0,
              chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (inputs, labels), both (num_examples, seq_len) int64; same seed, same tensors."""
    spec.check()
    if num_examples < 1:
        raise ValueError(f"num_examples: must be >= 1, got {num_examples}")
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for start in range(0, num_examples, chunk):
        n = min(chunk, num_examples - start)
        x, y = _make_chunk(n, spec, gen)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _make_chunk(n: int, spec: MQARSpec, gen: torch.Generator):
    L, k, V = spec.seq_len, spec.num_pairs, spec.vocab_size
    half = V // 2
    keys = _sample_distinct(n, k, 1, half, gen)  # (n, k)
    values = _sample_distinct(n, k, half, V, gen)  # (n, k)
    ctx = 2 * k
    space = (L - ctx) // 2  # even query slots in the query region
    gaps = torch.multinomial(gap_probs(space, spec.power_a).float().expand(n, space), k,
                             replacement=False, generator=gen)  # (n, k) distinct slots
    qpos = ctx + 2 * gaps  # (n, k) positions of the queried keys
    inputs = torch.zeros(n, L, dtype=torch.long)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    filler = torch.randint(0, V, (n, L), generator=gen) if spec.random_fill else None
    is_query = torch.zeros(n, L, dtype=torch.bool)
    is_query.scatter_(1, qpos, True)
    is_query[:, :ctx] = True  # context positions are never overwritten
    if filler is not None:
        inputs = torch.where(is_query, inputs, filler)
    inputs.scatter_(1, qpos, keys)
    labels = torch.full((n, L), IGNORE, dtype=torch.long)
    labels.scatter_(1, qpos, values)
    return inputs, labels


def make_mqar_ref(num_examples: int, spec: MQARSpec = MQARSpec(), seed: int = 0):
    """Slow, obvious per-example construction from explicit (keys, values, gaps) lists; used
    by tests to check the layout of :func:`make_mqar`'s output. Returns the same structure
    (not the same random draws)."""
    import random

    spec.check()
    rnd = random.Random(seed)
    L, k, V = spec.seq_len, spec.num_pairs, spec.vocab_size
    space = (L - 2 * k) // 2
    w = gap_probs(space, spec.power_a).tolist()
    xs, ys = [], []
    for _ in range(num_examples):
        keys = rnd.sample(range(1, V // 2), k)
        values = rnd.sample(range(V // 2, V), k)
        gaps: list[int] = []
        while len(gaps) < k:
            g = rnd.choices(range(space), weights=w)[0]
            if g not in gaps:
                gaps.append(g)
        x = [rnd.randrange(V) if spec.random_fill else 0 for _ in range(L)]
        y = [IGNORE] * L
        for i, (kk, vv) in enumerate(zip(keys, values)):
            x[2 * i], x[2 * i + 1] = kk, vv
        for kk, vv, g in zip(keys, values, gaps):
            p = 2 * k + 2 * g
            x[p], y[p] = kk, vv
        xs.append(x)
        ys.append(y)
    return torch.tensor(xs), torch.tensor(ys)
