"""Tiny models with a real (byte-level) tokenizer and a chat template, for trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

# The builders live in the package (trilora bench and the README's examples use them too).
from trilora.train.tiny_model import CHAT_TEMPLATE, SPECIALS, save_tiny_lm, save_tokenizer  # noqa: F401


def write_jsonl(path: str | Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return Path(path)


def sft_records(n: int = 24, seed: int = 0) -> list[dict]:
    """Short instruction records of varied length, in all four SFT shapes."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        kind = i % 4
        if kind == 0:
            out.append({"instruction": f"repeat {q}", "input": "", "output": a})
        elif kind == 1:
            out.append({"prompt": f"Q: {q}\nA: ", "completion": a})
        elif kind == 2:
            out.append({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})  # fmt: skip
        else:
            out.append({"text": f"{q} -> {a}"})
    return out
