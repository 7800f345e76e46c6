"""Document corpora made from the shipped text, for document-packing tests and benchmarks.

Tiny Shakespeare has no act or scene markers: it is speaker turns (``NAME:\\n...``) separated
by blank lines. :func:`shakespeare_scenes` groups the turns into pseudo-scenes with a cast
heuristic: a new scene starts at a turn when none of the speakers of that turn and the next
two spoke in the previous eight turns (at least three turns per scene). On the shipped file
this gives 223 scenes, median ~3.7k characters (5%-95%: ~0.6k-14k). Joined, the scenes are
the original text exactly.

    python -m seqlm.data.corpora scenes out.jsonl   # one {"text": scene} record per scene
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from seqlm.data.sources import resolve_path

SHAKESPEARE = "data/tinyshakespeare.txt"


def shakespeare_scenes(text: Optional[str] = None, lookback: int = 8, lookahead: int = 3,
                       min_turns: int = 3) -> list[str]:
    """Tiny Shakespeare (or ``text`` in its format) split into pseudo-scenes (module doc)."""
    if text is None:
        text = resolve_path(SHAKESPEARE).read_text(encoding="utf-8")
    parts = text.split("\n\n")
    turns = [p + "\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    speakers = [t.split(":\n", 1)[0] if ":\n" in t else "" for t in turns]
    starts = [0]
    for i in range(1, len(turns)):
        before = set(speakers[max(0, i - lookback):i])
        after = set(speakers[i:i + lookahead])
        if not (before & after) and i - starts[-1] >= min_turns:
            starts.append(i)
    bounds = starts + [len(turns)]
    return ["".join(turns[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def write_scenes_jsonl(out: Path, text: Optional[str] = None) -> Path:
    """Write one ``{"text": scene}`` record per scene to ``out``; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for s in shakespeare_scenes(text):
            f.write(json.dumps({"text": s}) + "\n")
    return out


if __name__ == "__main__":  # pragma: no cover - thin CLI
    if len(sys.argv) != 3 or sys.argv[1] != "scenes":
        sys.exit("usage: python -m seqlm.data.corpora scenes OUT.jsonl")
    print(write_scenes_jsonl(Path(sys.argv[2])))
