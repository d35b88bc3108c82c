"""``trilora data check FILE``: is this JSONL ready to train on?

Reports: line and record counts, bad lines (``file:line`` and why), the shapes found, exact
duplicates, near-duplicates (word 3-gram Jaccard similarity >= --near-dup, found with
MinHash + locality-sensitive hashing, then verified exactly), and with a tokenizer
(``--model``) token counts, a length histogram and how many examples ``--max-seq-len``
would truncate. Exit status 0 when every line is usable, 1 otherwise.

No torch at import time; only ``--model`` loads a tokenizer (transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
from collections import defaultdict

from trilora.train.methods.settings import METHODS

__all__ = ["add_parser", "near_duplicates", "run"]

# --help shows the module docstring without its reStructuredText literal markup
_DESCRIPTION = (__doc__ or "").replace("``", "")
_NUM_PERM = 64
_BANDS = 16


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "data",
        help="check a JSONL dataset: format, duplicates, token lengths",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(
        dest="data_command",
        metavar="ACTION",
        required=True,
        help="what to do: check (the only action so far)",
    )
    c = sub.add_parser(
        "check",
        help="validate FILE and report duplicates and lengths",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("file", metavar="FILE", help="the JSONL file")
    c.add_argument(
        "--method",
        choices=METHODS,
        default="sft",
        help="which shapes are valid: sft (four shapes), dpo (pairs) or grpo (prompts) "
        "(default: sft)",
    )
    c.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="tokenizer source (HF folder or .gguf) for token counts (default: none, "
        "counts words instead)",
    )
    c.add_argument(
        "--max-seq-len",
        type=int,
        default=1024,
        help="report how many examples this length truncates (default: 1024)",
    )
    c.add_argument(
        "--near-dup",
        type=float,
        default=0.8,
        help="Jaccard similarity of word 3-grams counted as a near-duplicate (default: 0.8)",
    )
    c.add_argument(
        "--show", type=int, default=5, help="examples of each problem to list (default: 5)"
    )
    return p


def _text(record: dict) -> str:
    return json.dumps(
        {k: v for k, v in record.items() if not k.startswith("_")},
        sort_keys=True,
        ensure_ascii=False,
    )


def _shingles(text: str) -> set[str]:
    words = text.lower().split()
    if len(words) < 3:
        return {" ".join(words)}
    return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}


def _minhash(shingles: set[str]) -> list[int]:
    sig = []
    for seed in range(_NUM_PERM):
        salt = seed.to_bytes(2, "little")
        sig.append(
            min(
                int.from_bytes(hashlib.blake2b(salt + s.encode(), digest_size=8).digest(), "little")
                for s in shingles
            )
        )
    return sig


def near_duplicates(texts: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, jaccard)`` with word-3-gram Jaccard >= ``threshold`` (exact copies excluded)."""
    shingles = [_shingles(t) for t in texts]
    rows = _NUM_PERM // _BANDS
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, sh in enumerate(shingles):
        sig = _minhash(sh)
        for b in range(_BANDS):
            buckets[(b, *sig[b * rows : (b + 1) * rows])].append(i)
    seen, out = set(), []
    for members in buckets.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                if (i, j) in seen or texts[i] == texts[j]:
                    continue
                seen.add((i, j))
                inter = len(shingles[i] & shingles[j])
                jac = inter / max(1, len(shingles[i] | shingles[j]))
                if jac >= threshold:
                    out.append((i, j, jac))
    return sorted(out)


def _histogram(lengths: list[int], width: int = 40) -> list[str]:
    if not lengths:
        return []
    top = max(lengths)
    edges = [0]
    step = 1
    while step * 8 < top:
        step *= 2
    edges = list(range(0, top + step, step))
    counts = [sum(lo <= n < lo + step for n in lengths) for lo in edges[:-1]] or [len(lengths)]
    peak = max(counts)
    return [
        f"  {lo:>6}-{lo + step - 1:<6} {c:>6} {'#' * max(1 if c else 0, round(width * c / peak))}"
        for lo, c in zip(edges, counts)
    ]


def run(args: argparse.Namespace) -> int:
    from trilora.io import UserError
    from trilora.train import data as D
    from trilora.train.methods import record_format

    fmt = record_format(args.method)
    path = args.file
    stats = D.DataStats(os.fspath(path))
    rows = D.read_jsonl(path, skip_bad_lines=True, stats=stats)
    problems: list[str] = []
    # read again strictly line by line to name each bad line
    with open(path, "rb") as f:
        for number, raw in enumerate(f.read().split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                D.read_jsonl_line(raw, path, number)
            except UserError as exc:
                problems.append(str(exc))
    records, texts, where = [], [], []
    for number, record in rows:
        loc = f"{path}:{number}"
        try:
            shape = fmt.shape(record, loc)
        except UserError as exc:
            problems.append(str(exc))
            continue
        stats.shapes[shape] += 1
        records.append((loc, record, shape))
        texts.append(_text(record))
        where.append(loc)
    print(
        f"{path}: {stats.lines} lines, {len(records)} usable records, {len(problems)} with problems"
    )
    if stats.shapes:
        print("shapes: " + ", ".join(f"{k} {v}" for k, v in stats.shapes.most_common()))
    for msg in problems[: args.show]:
        print(f"  problem: {msg}")
    if len(problems) > args.show:
        print(f"  ... and {len(problems) - args.show} more")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[hashlib.sha256(t.encode()).hexdigest()].append(i)
    dups = [g for g in groups.values() if len(g) > 1]
    in_dups = sum(len(g) for g in dups)
    print(
        f"exact duplicates: {in_dups} records in {len(dups)} group{'' if len(dups) == 1 else 's'}"
        + (f" ({in_dups - len(dups)} could go)" if dups else "")
    )
    for g in dups[: args.show]:  # every copy of a group, on one line
        print("  " + " = ".join(where[i] for i in g))
    if len(dups) > args.show:
        print(f"  ... and {len(dups) - args.show} more groups")
    near = near_duplicates(texts, args.near_dup)
    print(f"near-duplicates (word 3-gram Jaccard >= {args.near_dup}): {len(near)} pairs")
    for i, j, jac in near[: args.show]:
        print(f"  {where[i]} ~ {where[j]} ({jac:.2f})")
    if args.model:
        from transformers import AutoTokenizer

        from trilora.train.model import resolve_source

        folder = resolve_source(args.model, print)
        tok = AutoTokenizer.from_pretrained(folder)
        lengths, truncated, too_long = [], 0, []
        for loc, record, shape in records:
            try:
                ex = fmt.encode(record, shape, tok, 10**9, loc)
                n = len(ex)
                # where the loss starts: the first labelled token (a prompt has none: its end)
                part = fmt.parts(ex)[0]
                labels = getattr(part, "labels", None) or [D.IGNORE] * len(part)
                first = next((i for i, lab in enumerate(labels) if lab != D.IGNORE), len(part))
            except UserError as exc:
                problems.append(str(exc))
                print(f"  problem: {exc}")
                continue
            lengths.append(n)
            truncated += n > args.max_seq_len
            if first >= args.max_seq_len:
                too_long.append(loc)
        if lengths:
            print(
                f"tokens: {sum(lengths)} total; per example min {min(lengths)}, median "
                f"{statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.1f}, "
                f"max {max(lengths)}"
            )
            print("length histogram (tokens):")
            print("\n".join(_histogram(lengths)))
            print(
                f"--max-seq-len {args.max_seq_len}: {truncated} examples would be truncated"
                + (
                    f", {len(too_long)} have a longer prompt (fatal in training): "
                    f"{', '.join(too_long[: args.show])}"
                    if too_long
                    else ""
                )
            )
            if too_long:
                problems.append("prompts longer than --max-seq-len")
    else:
        words = [len(t.split()) for t in texts]
        if words:
            print(
                f"words per record: min {min(words)}, median {statistics.median(words):.0f}, "
                f"max {max(words)} (pass --model for token counts and truncation)"
            )
    if not records:
        print("no usable records")
        return 1
    return 1 if problems else 0
