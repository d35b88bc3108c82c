"""GRPO reward functions: built-ins for verifiable tasks and the user's own.

A reward function follows TRL's calling convention::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **fields) -> [float, ...]

one entry per completion: ``prompts`` as the records give them (text, or a list of
messages), ``completions`` text (or ``[{"role": "assistant", "content": text}]`` when the
prompt is a list of messages), ``completion_ids`` the generated token ids, and every other
field of the records as a keyword list (``answer=[...]``). It returns one number per
completion (``None``: not applicable, TRL's meaning; it counts as no reward).

``--reward`` names one or more, separated by ``;``:

* ``json``: 1 if the completion parses as JSON, else 0; ``json:a|b``: 1 if it parses to an
  object holding the fields ``a`` and ``b``;
* ``regex:PATTERN``: 1 if ``re.search(PATTERN, completion)`` finds a match;
* ``equals:FIELD``: 1 if the completion (stripped) equals the record's ``FIELD`` (as text);
* ``contains:FIELD``: 1 if the completion contains the record's ``FIELD`` (as text);
* ``length:MIN-MAX``: 1 if the completion has between ``MIN`` and ``MAX`` characters;
* ``path/to/file.py:function`` or ``module:function``: the user's own function.

``--reward-weights`` gives one weight per function (``,``-separated; default 1 each); the
reward of a completion is the weighted sum.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trilora.io import UsageError, UserError

__all__ = ["Reward", "RewardError", "parse_rewards", "score_rewards"]


class RewardError(UserError):
    """A reward function raised, or returned the wrong count or a non-number."""


@dataclass(frozen=True)
class Reward:
    """One reward function: ``name`` (its metrics key ``reward_<name>``), ``fn`` (TRL's
    convention) and ``weight``."""

    name: str
    fn: Callable[..., list]
    weight: float = 1.0


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # [{"role": "assistant", "content": ...}]
        return completion[-1].get("content", "") if completion else ""
    return completion


def _json(fields: list[str]) -> Callable[..., list]:
    def json_reward(completions, **_):
        out = []
        for c in completions:
            try:
                value = json.loads(_text(c).strip())
            except ValueError:
                out.append(0.0)
                continue
            if fields:
                out.append(float(isinstance(value, dict) and all(f in value for f in fields)))
            else:
                out.append(1.0)
        return out

    return json_reward


def _regex(pattern: str, spec: str) -> Callable[..., list]:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UsageError(f"--reward {spec!r}: not a valid regular expression ({exc})") from None

    def regex_reward(completions, **_):
        return [float(compiled.search(_text(c)) is not None) for c in completions]

    return regex_reward


def _field(name: str, contains: bool) -> Callable[..., list]:
    def field_reward(completions, **fields):
        if name not in fields:
            raise KeyError(f"the records have no field {name!r}")
        refs = fields[name]
        if contains:
            return [float(str(r) in _text(c)) for c, r in zip(completions, refs)]
        return [float(_text(c).strip() == str(r).strip()) for c, r in zip(completions, refs)]

    field_reward.__name__ = f"{'contains' if contains else 'equals'}_{name}"
    return field_reward


def _length(band: str, spec: str) -> Callable[..., list]:
    try:
        low, high = (int(x) for x in band.split("-"))
    except ValueError:
        raise UsageError(f"--reward {spec!r}: expected length:MIN-MAX (characters)") from None

    def length_reward(completions, **_):
        return [float(low <= len(_text(c)) <= high) for c in completions]

    return length_reward


def _user_function(spec: str) -> Callable[..., list]:
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise UsageError(f"--reward {spec!r}: no such file {where}")
        module_name = f"_trilora_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise UsageError(f"--reward {spec!r}: importing {where} failed: {exc!r}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise UsageError(f"--reward {spec!r}: cannot import module {where} ({exc!r})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--reward {spec!r}: {where} has no function {name!r}")
    return fn


def _one(spec: str) -> tuple[str, Callable[..., list]]:
    kind, _, arg = spec.partition(":")
    if kind == "json":
        fields = [f for f in arg.split("|") if f]
        return "json", _json(fields)
    if kind == "regex" and arg:
        return "regex", _regex(arg, spec)
    if kind in ("equals", "contains") and arg:
        return f"{kind}_{arg}", _field(arg, kind == "contains")
    if kind == "length" and arg:
        return "length", _length(arg, spec)
    if ":" in spec and spec.rpartition(":")[2].isidentifier():
        fn = _user_function(spec)
        return getattr(fn, "__name__", spec.rpartition(":")[2]), fn
    raise UsageError(
        f"--reward {spec!r}: expected json[:a|b], regex:PATTERN, equals:FIELD, contains:FIELD, "
        "length:MIN-MAX, path/to/file.py:function or module:function"
    )


def parse_rewards(spec: str | None, weights: str | None) -> list[Reward]:
    """The reward functions of ``--reward`` (``;``-separated) with ``--reward-weights``.

    Raises:
        UsageError: an unknown or unloadable function, a bad weight list.
    """
    specs = [s.strip() for s in (spec or "").split(";") if s.strip()]
    if not specs:
        raise UsageError("--reward: GRPO needs at least one reward function (see --help)")
    ws = [1.0] * len(specs)
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(
                f"--reward-weights {weights!r}: expected numbers separated by ,"
            ) from None
        if len(ws) != len(specs):
            raise UsageError(
                f"--reward-weights: {len(ws)} weights for {len(specs)} reward functions"
            )
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for s, w in zip(specs, ws):
        name, fn = _one(s)
        name = re.sub(r"\W+", "_", name).strip("_") or "reward"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        out.append(Reward(name, fn, w))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def score_rewards(
    rewards: list[Reward],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    fields: dict[str, list],
) -> list[list[float]]:
    """``[completions][functions]`` rewards (NaN where a function returned None).

    Raises:
        RewardError: a function raised, or returned the wrong count or a non-number; the
            one line names the function and what it returned.
    """
    n = len(completions)
    columns = []
    for r in rewards:
        try:
            got = r.fn(
                prompts=prompts, completions=completions, completion_ids=completion_ids, **fields
            )
        except Exception as exc:
            raise RewardError(
                f"reward function {r.name} raised {type(exc).__name__}: {exc}"
            ) from None
        try:
            values = list(got)
        except TypeError:
            raise RewardError(
                f"reward function {r.name} returned {_shown(got)}, not a list of {n} numbers"
            ) from None
        if len(values) != n:
            raise RewardError(
                f"reward function {r.name} returned {len(values)} values for {n} completions: "
                f"{_shown(values)}"
            )
        column = []
        for v in values:
            if v is None:
                column.append(math.nan)
                continue
            if not isinstance(v, int | float) or not math.isfinite(v):
                # a 0-d tensor or numpy number is a number too
                item = getattr(v, "item", None)
                v = item() if callable(item) and getattr(v, "ndim", 1) == 0 else v
                if not isinstance(v, int | float) or not math.isfinite(v):
                    raise RewardError(
                        f"reward function {r.name} returned {_shown(v)} among its values, not a "
                        "finite number"
                    )
            column.append(float(v))
        columns.append(column)
    return [list(row) for row in zip(*columns)]
