"""What ``trilora mem`` answers: a step's report at any depth (:func:`profile`), the
largest length or batch that fits a budget (:func:`find_max`), and sweeps over lengths.

Three depths (``profile(depth=...)``):

* ``"full"`` traces every layer (``trilora mem --confirm``);
* ``"extrapolate"``: traces :func:`~trilora.memory.depth.depth_samples` layers (3 and 4)
  at the full length and extrapolates (:mod:`trilora.memory.depth`);
* ``"fast"`` (the default of the CLI): :class:`trilora.memory.fast.FastProfiler`, which
  also extrapolates along the length, exactly, from three short traces
  (:mod:`trilora.memory.timeline`): seconds for any length on the lattice of regular
  lengths (multiples of 2,048 tokens with auto MLP chunks).
"""

from __future__ import annotations

import math
from dataclasses import replace

from trilora.memory import optimizer_model
from trilora.memory.depth import depth_samples, profile_depth
from trilora.memory.fast import FastProfiler
from trilora.memory.fitting import largest_fitting
from trilora.memory.moe import check_traceable, find_max_moe, is_moe, moe_report
from trilora.memory.progress import as_progress
from trilora.memory.report import DEPTHS, OVERHEADS, PROVIDERS, MemOptions, MemReport, format_bytes
from trilora.memory.trace import build_meta_model, static_breakdown, trainable_itemsize
from trilora.patches.embedding_offload import input_embedding_bytes


def profile(
    config,
    opts: MemOptions,
    provider: str = "trilora",
    depth: str = "full",
    name: str = "",
    progress=None,
) -> MemReport:
    """Trace ``provider``'s step ("trilora" or "bnb_peft").

    ``depth="full"`` traces every layer; ``depth="extrapolate"`` traces
    :func:`depth_samples` (3 and 4) layers and extrapolates each category linearly;
    ``depth="fast"`` also extrapolates along the length from short traces
    (:class:`~trilora.memory.fast.FastProfiler`; exact on its lattice of lengths, and it traces
    other lengths itself, depth-extrapolated).

    A mixture-of-experts model is not traced: ``depth="fast"`` answers it from the
    analytical model (:func:`~trilora.memory.moe.moe_report`), the other depths raise
    ValueError (:func:`~trilora.memory.moe.check_traceable`).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    opts.validate()
    if is_moe(config):
        if depth != "fast":
            check_traceable(config)
        return moe_report(config, opts, provider, name)
    if depth == "fast":
        fast = FastProfiler(config, opts, provider, "seq_len", name, progress)
        lattice = fast.lattice(opts.seq_len)
        if lattice is None or lattice.index(opts.seq_len) > lattice.first + 2:
            return fast.report(opts.seq_len)
        # within the five short traces' own lengths: the two depth samples at this length
        # are the cheaper exact answer
        depth = "extrapolate"
    return profile_depth(config, opts, provider, depth, name, progress)


def minimum_bytes(config, opts: MemOptions) -> int:
    """Device bytes before any activation: weights, LoRA, gradients, optimizer state, overheads.

    Built from the :func:`depth_samples` depths and extrapolated (every tensor of a model is
    per layer or per model): a 70B model's full meta model takes seconds to build.
    """

    def floor(layers: int | None) -> int:
        model = build_meta_model(config, opts, layers)
        static = static_breakdown(model)
        params = [p for p in model.parameters() if p.requires_grad]
        state = optimizer_model.device_floor(
            opts.optimizer, [p.numel() for p in params], trainable_itemsize(params)
        )
        host = input_embedding_bytes(model) if opts.offload_embeddings else 0
        return sum(static.values()) - host + state

    depths = depth_samples(config)
    if depths is None:
        fixed = floor(None)
    else:
        la, lb = depths
        a, b = floor(la), floor(lb)
        fixed = a + (b - a) * (config.num_hidden_layers - la) // (lb - la)
    return fixed + sum(OVERHEADS.values())


def find_max(
    config,
    opts: MemOptions,
    budget: int,
    search: str = "seq_len",
    provider: str = "trilora",
    name: str = "",
    multiple: int = 1024,
    progress=None,
    confirm: bool = False,
    profiler=None,
) -> tuple[int, MemReport | None]:
    """Largest ``seq_len`` (or ``batch``) whose step fits ``budget`` bytes, and its report.

    The search runs on :class:`~trilora.memory.fast.FastProfiler`: three short traces at a
    few layers each, then every length on its lattice (multiples of 2,048 tokens with auto
    MLP chunks) costs nothing and is exact, so the answer is the largest lattice value whose
    step fits, and the next lattice value's does not, at the precision ``lcm(multiple,
    lattice step)``. Values below the lattice's first samples are traced themselves at the
    precision ``multiple`` (depth-extrapolated).

    ``confirm``: then re-search on **full-depth** traces seeded with that answer, at the
    precision ``multiple`` (1 for batch): the returned value's full-depth trace fits and the
    full-depth trace of ``value + multiple`` does not (minutes per trace at long context).

    The returned report's ``options["search"]`` records the precision, the next value and
    its total, and every evaluated total. ``progress``: a
    :class:`trilora.memory.progress.Progress` (or a callable taking one line per trace).
    ``profiler``: a :class:`~trilora.memory.fast.FastProfiler` of the same config, options,
    provider and ``search`` dimension whose traces to reuse (e.g. several budgets).

    Raises ValueError when even the weights do not fit, naming the minimum.
    """
    if search not in ("seq_len", "batch"):
        raise ValueError(f"search must be 'seq_len' or 'batch', got {search!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    opts.validate()
    if is_moe(config):
        if confirm:
            check_traceable(config)
        return find_max_moe(config, opts, budget, search, provider, name, multiple)
    floor = minimum_bytes(config, opts)
    if budget <= floor:
        raise ValueError(
            f"budget {format_bytes(budget)} is smaller than the model's fixed footprint "
            f"(weights, LoRA, gradients, optimizer state, CUDA overheads) of "
            f"{format_bytes(floor)}; the minimum budget is above {format_bytes(floor)}"
        )
    progress = as_progress(progress)
    unit = multiple if search == "seq_len" else 1
    if profiler is None:
        fast = FastProfiler(config, opts, provider, search, name, progress)
    elif (profiler.config, profiler.opts, profiler.provider, profiler.dimension) != (
        config,
        opts,
        provider,
        search,
    ):
        raise ValueError("profiler was built for another model, options, provider or dimension")
    else:
        fast = profiler
    evaluated: dict[int, int] = {}

    def total(v: int) -> int:
        if v not in evaluated:
            rep = fast.report(v)
            evaluated[v] = rep.total
            verdict = "fits" if rep.total <= budget else "exceeds"
            progress.line(
                f"{search}={v:,} ({_METHOD_NAMES[rep.method]}): "
                f"{format_bytes(rep.total)}, {verdict}"
            )
        return evaluated[v]

    start = getattr(opts, search)
    step = math.lcm(unit, fast.period())
    value, _ = largest_fitting(total, budget, step, max(start, fast.first_regular()))
    if value < fast.first_regular() and step > unit:
        # below the lattice: the values are traced themselves, at the finer precision
        value, _ = largest_fitting(total, budget, unit, max(value, unit))
        step = unit
    if value == 0:
        return 0, None
    info = {
        "dimension": search,
        "budget": budget,
        "method": "fast",
        "precision": step,
        "next_value": value + step,
        "next_total": total(value + step),
        "evaluated": {str(k): v for k, v in sorted(evaluated.items())},
    }
    rep = fast.report(value)
    if confirm:
        reports: dict[int, MemReport] = {}

        def full(v: int) -> int:
            if v not in reports:
                reports[v] = profile(
                    config, replace(opts, **{search: v}), provider, "full", name, progress
                )
                verdict = "fits" if reports[v].total <= budget else "exceeds"
                progress.line(
                    f"{search}={v:,} (full depth): "
                    f"{format_bytes(reports[v].total)}, {verdict} "
                    f"[{reports[v].trace_seconds:.0f} s]"
                )
            return reports[v].total

        fast_value = value
        value, seen = largest_fitting(full, budget, unit, value)
        if value == 0:
            return 0, None
        rep = reports[value]
        info = {
            **info,
            "method": "full",
            "precision": unit,
            "fast_answer": fast_value,
            "next_value": value + unit,
            "next_total": seen.get(value + unit),
            "full_depth_traces": {str(k): v for k, v in sorted(seen.items())},
        }
    rep.options["search"] = info
    return value, rep


_METHOD_NAMES = {
    "analytical": "analytical",
    "full": "full depth",
    "extrapolated": "traced",
    "lattice": "lattice",
}


def sweep(
    config,
    opts: MemOptions,
    seq_lens: list[int],
    provider: str = "trilora",
    name: str = "",
    depth: str = "fast",
    progress=None,
) -> list[MemReport]:
    """Reports for each sequence length: ``depth="fast"`` shares one
    :class:`~trilora.memory.fast.FastProfiler` (three short traces for every lattice length);
    ``"extrapolate"`` or ``"full"`` traces each length. A mixture-of-experts model is
    answered by :func:`~trilora.memory.moe.moe_report` (``depth="fast"`` only)."""
    if depth != "fast" or is_moe(config):
        return [
            profile(config, replace(opts, seq_len=t), provider, depth, name, progress)
            for t in seq_lens
        ]
    fast = FastProfiler(config, opts, provider, "seq_len", name, progress)
    return [fast.report(t) for t in seq_lens]
