"""Phonebook lookup: n lines "Name Surname: ddd-dddd", then the query "Name Surname:"; correct
when the generated text starts with that person's number (exact match). Accuracy vs n."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from seqlm.eval.tasks.common import TextExample, encode_examples, greedy_answers, plot_curve, rng, write_json

FIRST = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hal", "Ida", "Jon", "Kay", "Leo", "Mia",
         "Ned", "Olga", "Pia", "Ray", "Sue", "Tom", "Uma", "Vic", "Wes", "Yara", "Zoe")
LAST = ("Abbot", "Baker", "Carter", "Dalton", "Ellis", "Fisher", "Garcia", "Hughes", "Irwin", "Jones",
        "Keller", "Lopez", "Moore", "Nolan", "Owens", "Parker", "Quinn", "Reyes", "Stone", "Turner",
        "Upton", "Vance", "Walsh", "Young")


def make_phonebook(n_entries: int, seed: int = 0) -> TextExample:
    if n_entries < 1:
        raise ValueError(f"n_entries: must be >= 1, got {n_entries}")
    if n_entries > len(FIRST) * len(LAST):
        raise ValueError(f"n_entries: at most {len(FIRST) * len(LAST)} distinct names, got {n_entries}")
    r = rng(seed)
    names = r.sample([f"{a} {b}" for a in FIRST for b in LAST], n_entries)
    numbers = [f"{r.randint(200, 999)}-{r.randint(0, 9999):04d}" for _ in names]
    q = r.randrange(n_entries)
    book = "".join(f"{n}: {num}\n" for n, num in zip(names, numbers))
    return TextExample(book + f"{names[q]}:", " " + numbers[q],
                       {"name": names[q], "number": numbers[q], "index": q, "n_entries": n_entries})


def phonebook_correct(generated: str, ex: TextExample) -> bool:
    return generated.strip().startswith(ex.meta["number"])


def phonebook_dataset(tok, n: int, sizes: Sequence[int], seed: int = 0, seq_len=None):
    r = rng(seed)
    exs = [make_phonebook(r.choice(list(sizes)), r.randrange(1 << 30)) for _ in range(n)]
    return encode_examples(tok, exs, seq_len)


def evaluate_phonebook(model, tok, sizes=(4, 8, 16, 32, 64), n_per_size: int = 10, seed: int = 0,
                       out_dir=None, title: str = "phonebook") -> dict:
    rows = []
    for s in sizes:
        exs = [make_phonebook(s, seed * 1_000_003 + i) for i in range(n_per_size)]
        gens = greedy_answers(model, tok, [e.prompt for e in exs], max_new_tokens=10)
        ok = [phonebook_correct(g, e) for g, e in zip(gens, exs)]
        rows.append({"n_entries": s, "accuracy": sum(ok) / len(ok), "n": len(ok),
                     "examples": [{"answer": e.answer, "generated": g} for e, g in zip(exs[:2], gens[:2])]})
    res = {"task": "phonebook", "sizes": list(sizes), "accuracy": [r["accuracy"] for r in rows], "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / "phonebook.json", res)
        plot_curve(list(sizes), res["accuracy"], out / "phonebook.png", f"{title}: accuracy", "entries")
    return res
