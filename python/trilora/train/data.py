"""Training data: JSONL in, token rows and batches out.

Accepted shapes (one JSON object per line):

* SFT: ``{"instruction", "input"?, "output"}``, ``{"prompt", "completion"}``,
  ``{"messages": [{"role", "content"}, ...]}`` (the tokenizer's chat template) and
  ``{"text"}``. The loss falls on the response tokens only (``output``, ``completion``,
  assistant turns), except for ``text``, where every token counts.
* DPO: ``{"prompt", "chosen", "rejected"}``; ``prompt`` is text or a list of messages,
  ``chosen`` / ``rejected`` text (or a list holding one assistant message).
* GRPO: ``{"prompt", ...}``; ``prompt`` is text or a list of messages, every other field
  is passed to the reward functions.

Each training method names its :class:`RecordFormat` (``SFT_RECORDS``, ``PAIR_RECORDS``,
``PROMPT_RECORDS``): how a record is checked and tokenized.

Every example is a list of token ids plus labels (``-100`` where no loss falls). The label
of an example's first token is always ``-100``: the causal shift would otherwise make the
previous example's last token predict it when examples are packed into one row.

Batches are drawn from a permutation seeded by ``(seed, epoch)``, so the data position of a
run is one integer (micro-batches consumed) and a resumed run draws exactly the batches the
uninterrupted run would have drawn.

Only :func:`collate` and :func:`collate_pairs` need torch (imported inside).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trilora.io import UserError

__all__ = [
    "IGNORE",
    "PAIR_RECORDS",
    "PROMPT_RECORDS",
    "SFT_RECORDS",
    "DataStats",
    "Example",
    "PairExample",
    "PromptExample",
    "RecordFormat",
    "batches_for_epoch",
    "collate",
    "collate_pairs",
    "encode_pair",
    "encode_prompt",
    "encode_sft",
    "load_dataset",
    "pack",
    "pair_shape",
    "prompt_shape",
    "read_jsonl",
    "record_shape",
    "split_validation",
]

IGNORE = -100
SFT_SHAPES = (
    '{"instruction", "input" (optional), "output"}, {"prompt", "completion"}, '
    '{"messages": [{"role", "content"}, ...]} or {"text"}'
)
DPO_SHAPE = '{"prompt", "chosen", "rejected"}'
PROMPT_SHAPE = '{"prompt": text or messages, any other fields}'


@dataclass
class Example:
    """One tokenized SFT example: ``input_ids`` and ``labels`` of equal length."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PairExample:
    """One tokenized preference pair: prompt + chosen and prompt + rejected."""

    chosen: Example
    rejected: Example
    source: str

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class DataStats:
    """What loading a file found; printed by the trainer and ``trilora data check``."""

    path: str
    lines: int = 0
    records: int = 0
    bad_lines: int = 0
    truncated: int = 0
    shapes: Counter = field(default_factory=Counter)
    tokens: int = 0
    loss_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["shapes"] = dict(self.shapes)
        return d


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


def read_jsonl(
    path: str | os.PathLike, skip_bad_lines: bool = False, stats: DataStats | None = None
) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of ``path``.

    Raises:
        UserError: a line that is not UTF-8, not JSON or not an object, naming
            ``file:line`` (unless ``skip_bad_lines``: then it is counted in ``stats``).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; expected a JSONL file") from None
    out = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        if stats is not None:
            stats.lines += 1
        try:
            obj = read_jsonl_line(raw, path, number)
        except UserError:
            if not skip_bad_lines:
                raise
            if stats is not None:
                stats.bad_lines += 1
            continue
        out.append((number, obj))
    return out


def read_jsonl_line(raw: bytes, path: str, number: int) -> dict:
    """One line as a JSON object, or :class:`UserError` naming ``path:number`` and the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = (
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        )
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
        else:
            if isinstance(obj, dict):
                return obj
            problem = f"expected a JSON object, got {type(obj).__name__}"
    raise UserError(f"{path}:{number}: {problem} (or pass --skip-bad-lines)")


def _need(record: dict, where: str, name: str, kinds: tuple, shape: str, accepted: str) -> None:
    if name not in record:
        raise UserError(
            f"{where}: missing field {name!r} for the {shape} shape; accepted shapes: {accepted}"
        )
    if not isinstance(record[name], kinds):
        kind = " or ".join(k.__name__ for k in kinds)
        raise UserError(
            f"{where}: field {name!r} must be {kind}, got {type(record[name]).__name__}"
        )


def pair_shape(record: dict, where: str) -> str:
    """``"pair"`` for a ``{"prompt", "chosen", "rejected"}`` record.

    Raises:
        UserError: a field is missing or has the wrong type.
    """
    for name in ("prompt", "chosen", "rejected"):
        _need(record, where, name, (str, list), "preference", DPO_SHAPE)
    return "pair"


def prompt_shape(record: dict, where: str) -> str:
    """``"prompt"`` for a ``{"prompt": text or messages, ...}`` record (the other fields
    are the record's own, passed to reward functions).

    Raises:
        UserError: ``prompt`` is missing, empty, or not text / a list of messages.
    """
    _need(record, where, "prompt", (str, list), "prompt", PROMPT_SHAPE)
    prompt = record["prompt"]
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: prompt[{i}] must be an object with 'role' and 'content'")
    if not prompt:
        raise UserError(f"{where}: 'prompt' is empty")
    return "prompt"


def record_shape(record: dict, where: str) -> str:
    """The SFT shape of ``record``: ``"instruction"``, ``"prompt_completion"``,
    ``"messages"`` or ``"text"``.

    Raises:
        UserError: a field is missing or has the wrong type; the message names the field
            and the accepted shapes.
    """

    def need(name: str, kinds: tuple, shape: str) -> None:
        _need(record, where, name, kinds, shape, accepted)

    accepted = SFT_SHAPES
    if "messages" in record:
        need("messages", (list,), "messages")
        msgs = record["messages"]
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise UserError(
                    f"{where}: messages[{i}] must be an object with string 'role' and 'content'"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: messages has no assistant turn, so nothing to learn")
        return "messages"
    if "instruction" in record:
        need("instruction", (str,), "instruction")
        need("output", (str,), "instruction")
        if "input" in record and not isinstance(record["input"], str | type(None)):
            raise UserError(f"{where}: field 'input' must be str")
        return "instruction"
    if "prompt" in record:
        need("prompt", (str,), "prompt/completion")
        need("completion", (str,), "prompt/completion")
        return "prompt_completion"
    if "text" in record:
        need("text", (str,), "text")
        return "text"
    if "completion" in record or "output" in record:
        missing = "prompt" if "completion" in record else "instruction"
        raise UserError(f"{where}: missing field {missing!r}; accepted shapes: {accepted}")
    raise UserError(
        f"{where}: no known fields (found {sorted(record)[:6]}); accepted shapes: {accepted}"
    )


# ---------------------------------------------------------------------------------------
# rendering and tokenizing
# ---------------------------------------------------------------------------------------

ALPACA_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
ALPACA_RESPONSE = "### Response:\n"


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja errors: the template rejected the conversation
        raise UserError(
            f"{where}: the tokenizer's chat template rejected the messages "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """Text pieces of the rendered conversation, flagged True for assistant turns."""
    if not _has_chat_template(tokenizer):
        raise UserError(
            f"{where}: the messages shape needs a tokenizer with a chat template, "
            "and this model's tokenizer has none"
        )
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], True, where)
        full = _render(tokenizer, messages[: i + 1], False, where)
        if not (head.startswith(done) and full.startswith(head)):
            raise UserError(
                f"{where}: the chat template does not render conversations "
                "prefix by prefix, so assistant turns cannot be located"
            )
        segments.append((head[len(done) :], False))
        segments.append((full[len(head) :], True))
        done = full
    rest = _render(tokenizer, messages, False, where)
    if rest.startswith(done) and len(rest) > len(done):
        segments.append((rest[len(done) :], False))
    return segments


def prompt_text(tokenizer, record: dict, shape: str) -> str:
    """The prompt as the model sees it at generation time (for base-vs-tuned answers)."""
    if shape == "messages":
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return _render(tokenizer, msgs[:last], True, "prompt")
    if shape == "instruction":
        return _instruction_segments(tokenizer, record, "prompt")[0][0]
    if shape in ("prompt_completion", "pair", "prompt"):
        p = record["prompt"]
        return _render(tokenizer, p, True, "prompt") if isinstance(p, list) else p
    return ""


def question_text(record: dict, shape: str) -> str:
    """What the user asked, as a person reads it (the last user turn, the instruction and its
    input, or the prompt): the label of a base-vs-tuned comparison, where
    :func:`prompt_text` is what the model is given."""
    if shape == "messages":
        users = [m for m in record["messages"] if m["role"] == "user"]
        return users[-1]["content"] if users else ""
    if shape == "instruction":
        extra = record.get("input")
        return f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
    if shape in ("prompt_completion", "pair", "prompt"):
        p = record["prompt"]
        if isinstance(p, list):
            users = [m for m in p if m.get("role") == "user"]
            return users[-1].get("content", "") if users else ""
        return p
    return ""


def reference_answer(record: dict, shape: str) -> str:
    if shape == "messages":
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    if shape == "instruction":
        return record["output"]
    if shape == "prompt_completion":
        return record["completion"]
    if shape == "pair":
        c = record["chosen"]
        return c if isinstance(c, str) else c[-1].get("content", "")
    return record.get("text", "")


def _instruction_segments(tokenizer, record: dict, where: str) -> list[tuple[str, bool]]:
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    if _has_chat_template(tokenizer):
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
        return _chat_segments(tokenizer, msgs, where)
    head = ALPACA_INSTRUCTION.format(instruction=record["instruction"])
    if record.get("input"):
        head += ALPACA_INPUT.format(input=record["input"])
    return [(head + ALPACA_RESPONSE, False), (record["output"], True)]


def _tokenize(tokenizer, text: str, first: bool) -> list[int]:
    if not text:
        return []
    # Chat templates spell out BOS themselves; raw text gets the tokenizer's own specials
    # (BOS for Llama-style tokenizers) at the start of an example only.
    return list(tokenizer(text, add_special_tokens=first)["input_ids"])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_sft(record: dict, shape: str, tokenizer, max_seq_len: int, where: str) -> Example:
    """Tokenize one SFT record; labels are ``-100`` outside the response.

    Raises:
        UserError: the prompt alone fills ``max_seq_len`` (no response token would remain).
    """
    ids: list[int] = []
    labels: list[int] = []
    chat = shape == "messages" or (shape == "instruction" and _has_chat_template(tokenizer))
    if shape == "messages":
        segments = _chat_segments(tokenizer, record["messages"], where)
    elif shape == "instruction":
        segments = _instruction_segments(tokenizer, record, where)
    elif shape == "prompt_completion":
        segments = [(record["prompt"], False), (record["completion"], True)]
    else:
        segments = [(record["text"], True)]
    for i, (text, trainable) in enumerate(segments):
        piece = _tokenize(tokenizer, text, first=(i == 0 and not chat))
        ids += piece
        labels += piece if trainable else [IGNORE] * len(piece)
    if not chat:
        eos = _eos(tokenizer)
        ids += eos
        labels += eos
    if not ids:
        raise UserError(f"{where}: the example is empty")
    labels[0] = IGNORE
    first_target = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
    if first_target is None:
        raise UserError(f"{where}: the response is empty, so nothing to learn")
    if first_target >= max_seq_len:
        raise UserError(
            f"{where}: the prompt is {first_target} tokens, longer than "
            f"--max-seq-len {max_seq_len}; raise --max-seq-len or shorten the "
            "prompt"
        )
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], where, truncated)


def _completion_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and isinstance(value[0].get("content"), str)
    ):
        return value[0]["content"]
    raise UserError(f"{where}: {name!r} must be text or a list with one assistant message")


def encode_pair(record: dict, tokenizer, max_seq_len: int, where: str) -> PairExample:
    """Tokenize one preference pair; completions are truncated, never the prompt."""
    prompt = record["prompt"]
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: prompt[{i}] must be an object with 'role' and 'content'")
    out = []
    truncated_any = False
    for name in ("chosen", "rejected"):
        completion = _completion_text(record[name], where, name)
        if isinstance(prompt, list):
            msgs = [*prompt, {"role": "assistant", "content": completion}]
            segments = _chat_segments(tokenizer, msgs, where)
            chat = True
        else:
            segments = [(prompt, False), (completion, True)]
            chat = False
        ids: list[int] = []
        labels: list[int] = []
        for i, (text, trainable) in enumerate(segments):
            piece = _tokenize(tokenizer, text, first=(i == 0 and not chat))
            ids += piece
            labels += piece if trainable else [IGNORE] * len(piece)
        if not chat:
            ids += _eos(tokenizer)
            labels += _eos(tokenizer)
        labels[0] = IGNORE
        first_target = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
        if first_target is None:
            raise UserError(f"{where}: {name!r} is empty")
        if first_target >= max_seq_len:
            raise UserError(
                f"{where}: the prompt is {first_target} tokens, longer than "
                f"--max-seq-len {max_seq_len}; raise --max-seq-len or shorten "
                "the prompt"
            )
        truncated = len(ids) > max_seq_len
        truncated_any |= truncated
        out.append(Example(ids[:max_seq_len], labels[:max_seq_len], where, truncated))
    return PairExample(out[0], out[1], where)


@dataclass
class PromptExample:
    """One tokenized prompt (GRPO): the ids the model continues, nothing to learn yet."""

    input_ids: list[int]
    source: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_prompt(record: dict, tokenizer, max_seq_len: int, where: str) -> PromptExample:
    """Tokenize a prompt record as the model sees it at generation time.

    Raises:
        UserError: the prompt alone fills ``max_seq_len`` (no room for a completion).
    """
    prompt = record["prompt"]
    if isinstance(prompt, list):
        ids = _tokenize(tokenizer, _render(tokenizer, prompt, True, where), first=False)
    else:
        ids = _tokenize(tokenizer, prompt, first=True)
    if len(ids) >= max_seq_len:
        raise UserError(
            f"{where}: the prompt is {len(ids)} tokens, longer than --max-seq-len "
            f"{max_seq_len}; raise --max-seq-len or shorten the prompt"
        )
    return PromptExample(ids, where)


@dataclass(frozen=True)
class RecordFormat:
    """How one training method's JSONL records are checked and tokenized.

    ``shape(record, where) -> str`` validates a record (raising :class:`UserError`) and
    names its shape; ``encode(record, shape, tokenizer, max_seq_len, where)`` tokenizes it;
    ``parts(example)`` lists the token sequences it holds (for the statistics).
    """

    shape: Callable[[dict, str], str]
    encode: Callable[[dict, str, Any, int, str], Any]
    parts: Callable[[Any], list]


SFT_RECORDS = RecordFormat(record_shape, encode_sft, lambda ex: [ex])
PAIR_RECORDS = RecordFormat(
    pair_shape,
    lambda record, _shape, tok, n, where: encode_pair(record, tok, n, where),
    lambda ex: [ex.chosen, ex.rejected],
)
PROMPT_RECORDS = RecordFormat(
    prompt_shape,
    lambda record, _shape, tok, n, where: encode_prompt(record, tok, n, where),
    lambda ex: [ex],
)


def load_dataset(
    path: str | os.PathLike,
    tokenizer,
    max_seq_len: int,
    records: RecordFormat = SFT_RECORDS,
    skip_bad_lines: bool = False,
) -> tuple[list, list[dict], DataStats]:
    """Read and tokenize ``path`` as ``records`` describes: ``(examples, records, stats)``.

    Raises:
        UserError: bad lines (see :func:`read_jsonl`), missing fields, prompts longer than
            ``max_seq_len``, or no usable example at all.
    """
    stats = DataStats(os.fspath(path))
    rows = read_jsonl(path, skip_bad_lines, stats)
    examples, kept = [], []
    for number, record in rows:
        where = f"{os.fspath(path)}:{number}"
        shape = records.shape(record, where)
        stats.shapes[shape] += 1
        ex = records.encode(record, shape, tokenizer, max_seq_len, where)
        parts = records.parts(ex)
        stats.truncated += any(p.truncated for p in parts)
        stats.tokens += sum(len(p) for p in parts)
        stats.loss_tokens += sum(
            sum(lab != IGNORE for lab in getattr(p, "labels", ())) for p in parts
        )
        examples.append(ex)
        kept.append({**record, "_shape": shape, "_source": where})
    stats.records = len(examples)
    if not examples:
        skipped = f", {stats.bad_lines} skipped as malformed" if stats.bad_lines else ""
        raise UserError(f"{os.fspath(path)}: no usable examples ({stats.lines} lines{skipped})")
    return examples, kept, stats


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, validation)``: a seeded ``fraction`` of ``range(n)`` held out."""
    import numpy as np

    if fraction <= 0:
        return list(range(n)), []
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise UserError(f"--val-fraction {fraction} of {n} examples leaves nothing to train on")
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val = sorted(int(i) for i in perm[:n_val])
    held = set(val)
    return [i for i in range(n) if i not in held], val


# ---------------------------------------------------------------------------------------
# packing and batching
# ---------------------------------------------------------------------------------------


def pack(examples: list[Example], max_seq_len: int) -> list[list[Example]]:
    """Best-fit-decreasing packing into rows of at most ``max_seq_len`` tokens.

    Deterministic: ties keep the input order. Each row is the list of its examples.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[Example]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i])
        best = -1
        for r, room in enumerate(free):
            if room >= n and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append([examples[i]])
            free.append(max_seq_len - n)
        else:
            rows[best].append(examples[i])
            free[best] -= n
    return rows


def batches_for_epoch(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The micro-batches (row indices) of one epoch, a pure function of its arguments.

    With ``group_by_length`` rows are shuffled, cut into mega-batches of 64 batches, sorted
    by length inside each (less padding), and the batches shuffled again; the batch holding
    the longest row goes first, so an out-of-memory shows up at step 1, not hours later.
    """
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    perm = [int(i) for i in rng.permutation(len(lengths))]
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = batch_size * 64
    batches = []
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = [int(i) for i in rng.permutation(len(batches))]
    batches = [batches[i] for i in order]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors for rows of one or more examples.

    One example per row: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` int64.
    Packed rows: ``input_ids``, ``position_ids`` (restarting at 0 for every example) and
    ``labels``, no attention mask; transformers then builds the block-diagonal causal mask
    from the position ids (SDPA/eager) or runs varlen flash attention (FlashAttention-2),
    so each example sees only itself. Padding forms its own segment with ignored labels.
    """

    packed = any(len(r) > 1 for r in rows)
    width = max(sum(len(e) for e in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex)
            ids[b, t : t + n] = torch.tensor(ex.input_ids)
            labels[b, t : t + n] = torch.tensor(ex.labels)
            pos[b, t : t + n] = torch.arange(n)
            mask[b, t : t + n] = 1
            t += n
        pos[b, t:] = torch.arange(width - t)
    if packed:
        return {"input_ids": ids, "position_ids": pos, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows, ``[2B, T]``, right-padded (see :func:`collate`)."""
    rows = [[p.chosen] for p in pairs] + [[p.rejected] for p in pairs]
    return collate(rows, pad_id)


def fingerprint_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (recorded in the run folder; resume checks it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_batches / grad_accum))
