"""One training step's report at a given depth, for either provider.

:func:`trace` traces ``trilora`` (:func:`trilora.memory.trace.trace_trilora`) or
``bnb_peft`` (:func:`trilora.memory.bnb_peft.trace_bnb_peft`) at some number of layers;
:func:`profile_depth` answers for the whole model, at full depth or extrapolated from two
depths (:func:`depth_samples`): decoder layers are identical, so every category is affine
in the number of layers once the peak sits at the same point of the step.
"""

from __future__ import annotations

from trilora.memory.bnb_peft import trace_bnb_peft
from trilora.memory.progress import as_progress
from trilora.memory.report import PROVIDERS, MemOptions, MemReport, extrapolate_depth
from trilora.memory.trace import StepTrace, trace_trilora

# Layers traced for the depth extrapolation. Layers 0 .. n-3 are identical in what they
# hold at the peak, but the last two are not: the last layer's input is never offloaded
# and the layer before it is unpacked synchronously with no prefetch ahead of it, so a
# 2-layer model lacks the prefetched input that every deeper model has at its peak. The
# increment from 2 to 3 layers therefore overstates the per-layer cost (by one layer input
# per layer, 11.9 GiB for Llama-3.1-8B at 50k tokens); from 3 to 4 it is exact.
EXTRAPOLATE_LAYERS = (3, 4)


def layer_period(config) -> int:
    """Smallest ``p`` with ``config.layer_types[i] == layer_types[i % p]`` (1 without types).

    Gemma-2 alternates sliding-window and global layers (p = 2), Gemma-3 has one global
    layer in six (p = 6); their layers are identical only in steps of ``p``.
    """
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or not types:
        return 1
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return p
    return len(types)


def depth_samples(config) -> tuple[int, int] | None:
    """The two depths the depth extrapolation traces, or None when the model is not deeper.

    :data:`EXTRAPOLATE_LAYERS` (3 and 4) for identical layers. With a layer pattern of
    period ``p`` (:func:`layer_period`) the two depths are ``p`` apart and congruent to the
    model's depth modulo ``p``, so the extra layers always come in whole patterns.
    """
    layers = config.num_hidden_layers
    p = layer_period(config)
    la = EXTRAPOLATE_LAYERS[0]
    la += (layers - la) % p
    lb = la + (EXTRAPOLATE_LAYERS[1] - EXTRAPOLATE_LAYERS[0]) * p
    return None if layers <= lb else (la, lb)


def trace(
    config,
    opts: MemOptions,
    provider: str = "trilora",
    num_layers: int | None = None,
    name: str = "",
    progress=None,
    recorder=None,
) -> StepTrace:
    """One traced step of ``provider`` at ``num_layers`` layers (None: all), reported to
    ``progress`` (:class:`trilora.memory.progress.Progress`) as a bar and one line."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    progress = as_progress(progress)
    fn = trace_trilora if provider == "trilora" else trace_bnb_peft
    layers = num_layers or config.num_hidden_layers
    desc = f"{provider}: {layers} layers x {opts.batch} x {opts.seq_len:,} tokens"
    with progress.trace(desc, 2 * layers) as tick:
        return fn(config, opts, num_layers, name, recorder=recorder, on_layer=tick)


def profile_depth(
    config,
    opts: MemOptions,
    provider: str = "trilora",
    depth: str = "full",
    name: str = "",
    progress=None,
) -> MemReport:
    """Trace ``provider``'s step at full depth (``depth="full"``) or at the
    :func:`depth_samples` depths (3 and 4 layers) and extrapolate each category linearly
    (``depth="extrapolate"``; full depth when the model is not deeper)."""
    depths = depth_samples(config) if depth == "extrapolate" else None
    if depths is None:
        return trace(config, opts, provider, None, name, progress).report()
    la, lb = depths
    a = trace(config, opts, provider, la, name, progress).report()
    b = trace(config, opts, provider, lb, name, progress).report()
    return extrapolate_depth(a, b, config.num_hidden_layers)
