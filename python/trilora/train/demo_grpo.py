"""``trilora train --demo grpo``: SmolLM2-135M-Instruct learns, by GRPO, to answer in one
word.

The task is verifiable: each prompt asks for the opposite of a word ("What is the opposite
of hot? Answer with one word."), and two rewards score a completion: :func:`one_word`
(1 / the number of words: a user function, named ``trilora.train.demo_grpo:one_word`` as
``--reward`` takes any ``module:function``) and the built-in ``contains:answer`` (it holds
the expected opposite). The base model answers in sentences ("The opposite of hot is
cold."), so it scores low on the first; a few minutes of GRPO on 2 CPU cores raise the
held-out mean reward. The prompts are a pure function of this module (no bundled file):
they are written to the run's cache folder on first use.

>>> python -m trilora.train.demo_grpo --write DIR     # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from trilora.io import atomic_write_text

__all__ = ["OPPOSITES", "REWARD", "demo_grpo_settings", "one_word", "write_prompts"]

# fmt: off
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("old", "new"), ("early", "late"), ("full", "empty"),
    ("wet", "dry"), ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"),
    ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("heavy", "light"),
    ("in", "out"), ("left", "right"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
    ("day", "night"), ("first", "last"), ("true", "false"), ("start", "finish"), ("black", "white"),
    ("north", "south"), ("east", "west"), ("inside", "outside"), ("before", "after"), ("above", "below"),
    ("yes", "no"), ("give", "take"), ("love", "hate"), ("near", "far"), ("good", "bad"),
    ("cheap", "expensive"), ("young", "old"), ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"),
    ("friend", "enemy"), ("sharp", "dull"), ("smooth", "rough"), ("safe", "dangerous"), ("always", "never"),
]
# fmt: on
QUESTION = "What is the opposite of {word}? Answer with one word."
REWARD = "trilora.train.demo_grpo:one_word; contains:answer"
HELD_OUT = 12


_PUNCTUATION = ".,;:!?'\"()"
MAX_WORD_LETTERS = 15


def one_word(completions: list, **_) -> list[float]:
    """1 / the number of words of each completion; 0 for an empty one, and 0 when any
    "word" is not one (letters and hyphens, at most 15 of them, once surrounding punctuation
    is stripped): a policy that drops its spaces ("HETATMHETATM...") would otherwise score 1
    with one long non-word, which GRPO found at lr 5e-3 in 8 steps. TRL's convention."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        words = [w.strip(_PUNCTUATION) for w in text.split()]
        real = all(0 < len(w) <= MAX_WORD_LETTERS and w.replace("-", "").isalpha() for w in words)
        out.append(1.0 / len(words) if words and real else 0.0)
    return out


def write_prompts(folder: Path) -> tuple[Path, Path]:
    """``train.jsonl`` and ``heldout.jsonl`` in ``folder`` (the same bytes every time)."""
    pairs = list(OPPOSITES)
    random.Random(2026).shuffle(pairs)
    records = [
        {"prompt": [{"role": "user", "content": QUESTION.format(word=w)}], "answer": a}
        for w, a in pairs
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, part in zip(paths, (records[HELD_OUT:], records[:HELD_OUT])):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in part))
    return paths


def demo_grpo_settings(model: str, cache: Path) -> dict:
    """The GRPO demo's run: LoRA r=16 on an NF4 base, 4 prompts x 4 completions a step."""
    train, held_out = write_prompts(cache / "grpo-demo")
    return {
        "model": model,
        "data": str(train),
        "val_data": str(held_out),
        "method": "grpo",
        "reward": REWARD,
        "quant": "nf4",
        "max_seq_len": 128,
        "batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 12,
        "temperature": 1.0,
        "lr": 2.5e-3,
        "lora_dropout": 0.0,
        "warmup_steps": 0,
        "max_steps": 12,
        "save_every": 0,
        "compare": 3,
        "max_new_tokens": 16,
        "eval_batch_size": 12,
        "out": "trilora-demo-grpo",
    }


def main() -> None:
    p = argparse.ArgumentParser(description="write the GRPO demo's prompts")
    p.add_argument("--write", metavar="DIR", required=True)
    a = p.parse_args()
    for path in write_prompts(Path(a.write)):
        print(path)


if __name__ == "__main__":
    main()
