"""Reports for any length (or batch) from a few short traces: what ``trilora mem`` runs.

A full-depth trace of a long-context step costs minutes (10 at 200k tokens for
Llama-3.1-8B on two cores), because the step is long loops: 32 layers, each running ~100
MLP chunks three times. :class:`FastProfiler` removes both loops from the cost:

* **depth**: layers are identical, so every category at the peak is affine in the number
  of layers: trace :func:`~trilora.memory.depth.depth_samples` layers (3 and 4; whole
  layer patterns for Gemma's sliding/global layers) and extrapolate (as before);
* **length**: on the lattice of *regular* lengths, multiples of :meth:`FastProfiler.period`
  tokens (2,048 with auto MLP chunks) at which every length-dependent loop has equal
  chunks, each op's bytes are affine in the lattice index, so the traces at indices
  ``n``, ``n + 1`` give the whole step's per-op timeline at any index, exactly, and a trace
  at ``n + 2`` checks it (:mod:`trilora.memory.timeline`).

Five short traces in all (3 and 4 layers at 8k-12k tokens for Llama-3.1-8B, a few seconds
each), after which every lattice length costs microseconds: the report of length
``m * 2048`` equals the report of the depth-extrapolated trace at that length byte for byte
(tests check it against full-depth traces). Lengths off the lattice (say 203,776 = 99.5 x
2,048, whose 100 MLP chunks are 2,038 tokens and one of 2,014) are traced themselves,
depth-extrapolated; the budget search only asks for lattice lengths once past the first
samples.

When the structure the extrapolation relies on is not there (the check trace disagrees, or
a pinned-memory budget caps the offload, which makes memory depend on the length in steps),
lengths are traced themselves, depth-extrapolated, as before; the result is the same,
only slower.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

from trilora.memory.depth import depth_samples, profile_depth, trace
from trilora.memory.progress import as_progress
from trilora.memory.report import MLP_CHUNK_TOKENS, MemOptions, MemReport, extrapolate_depth
from trilora.memory.timeline import LengthModel, TimelineMismatch, TimelineRecorder
from trilora.memory.trace import StepTrace
from trilora.ops.linear_cross_entropy import default_chunk_size

# The lattice's first sample has at least this many tokens (B x T): small steps have
# shape-dependent special cases (a loss chunk capped at the token count, single-row ops).
MIN_SAMPLE_TOKENS = 1024
# Lengths on a lattice are multiples of this many tokens at least. Odd lengths are not
# regular everywhere: bitsandbytes + PEFT's step at 1,024, 1,025 and 1,026 tokens is not
# affine op for op (the check trace catches it), at multiples of 1,024 it is.
LENGTH_GRANULE = 1024
# Loops with a length-dependent trip count need this many repetitions in the first sample:
# repetitions 0, 1, N-2 and N-1 are keyed (timeline.Timeline.pieces). The MLP loop of a
# layer's recompute runs one chunk fewer (non-reentrant checkpointing stops the recompute
# once the last saved tensor, the last chunk's input, is back), hence one more chunk.
MIN_REPETITIONS = 3


@dataclass(frozen=True)
class Lattice:
    """Values ``n * step`` for ``n >= first``, one loss-chunking regime (see :class:`FastProfiler`)."""

    step: int
    first: int
    regime: str  # "single" (one loss chunk) or "chunked" (equal loss chunks)

    def index(self, value: int) -> int | None:
        if value % self.step or value // self.step < self.first:
            return None
        return value // self.step


class FastProfiler:
    """Reports of ``provider``'s step at many values of ``dimension`` ("seq_len" or "batch").

    ``report(value)`` is exact: on the lattice it comes from the timeline extrapolation of
    five short traces (built on first use, reported to ``progress``), elsewhere from the
    depth-extrapolated trace of that value (cached).
    """

    def __init__(
        self,
        config,
        opts: MemOptions,
        provider: str = "trilora",
        dimension: str = "seq_len",
        name: str = "",
        progress=None,
    ):
        if dimension not in ("seq_len", "batch"):
            raise ValueError(f"dimension must be 'seq_len' or 'batch', got {dimension!r}")
        opts.validate()
        self.config, self.opts, self.provider = config, opts, provider
        self.dimension, self.name = dimension, name
        self.progress = as_progress(progress)
        self.depths = depth_samples(config)
        self._direct: dict[int, MemReport] = {}
        self._models: dict[Lattice, _LatticeModel | None] = {}

    # --- the lattice -------------------------------------------------------------------

    def _loss_chunk(self) -> int | None:
        """Tokens per full chunk of the fused loss (None when the loss is not chunked)."""
        if self.provider != "trilora" or not self.opts.fused_ce:
            return None

        return default_chunk_size(1 << 62, self.config.vocab_size)

    def _mlp_period(self) -> tuple[int, int]:
        """(tokens per lattice step, fewest tokens) of the MLP chunk loops along the length."""
        o = self.opts
        if self.provider != "trilora" or not o.checkpointing:
            return 1, 0
        if o.mlp_chunks == "auto":
            # equal 2,048-token pieces exactly at multiples of 2,048; four or more of them
            return MLP_CHUNK_TOKENS, (MIN_REPETITIONS + 1) * MLP_CHUNK_TOKENS
        if isinstance(o.mlp_chunks, int) and o.mlp_chunks > 1:
            return o.mlp_chunks, o.mlp_chunks  # k equal pieces of T / k rows
        return 1, 0

    def _length_period(self) -> tuple[int, int]:
        """(lattice step, fewest tokens) along the length, before the loss chunks' condition."""
        step, min_tokens = self._mlp_period()
        return math.lcm(step, LENGTH_GRANULE), min_tokens

    def period(self) -> int:
        """Lattice step of :attr:`dimension` (before the loss chunks' own condition)."""
        return self._length_period()[0] if self.dimension == "seq_len" else 1

    def lattice(self, value: int) -> Lattice | None:
        """The lattice ``value`` belongs to, or None (then it is traced itself)."""
        o = self.opts
        if o.pin_memory_budget is not None:
            return None  # the offload stops at a byte budget: memory is not affine in length
        per = o.batch if self.dimension == "seq_len" else o.seq_len  # tokens per unit
        step, min_tokens = self._length_period() if self.dimension == "seq_len" else (1, 0)
        min_tokens = max(min_tokens, MIN_SAMPLE_TOKENS)
        chunk = self._loss_chunk()
        regime = "single" if chunk is None or value * per <= chunk else "chunked"
        if regime == "chunked":
            # equal loss chunks: chunk divides the token count
            step = math.lcm(step, chunk // math.gcd(chunk, per))
            min_tokens = max(min_tokens, MIN_REPETITIONS * chunk)
        first = max(1, -(-min_tokens // (step * per)))
        if regime == "single" and chunk is not None and (first + 2) * step * per > chunk:
            return None  # no room for the samples below the loss chunk size
        lattice = Lattice(step, first, regime)
        return lattice if lattice.index(value) is not None else None

    def first_regular(self) -> int:
        """Smallest value the lattice serves (0 when there is none)."""
        step = self.period()
        for n in range(1, 4097):
            if self.lattice(n * step) is not None:
                return n * step
        return 0

    # --- reports -----------------------------------------------------------------------

    def report(self, value: int) -> MemReport:
        """The report at ``value`` of :attr:`dimension` (exact; see the class doc)."""
        opts = replace(self.opts, **{self.dimension: value})
        opts.validate()
        lattice = self.lattice(value)
        if lattice is not None:
            model = self._model(lattice)
            if model is not None:
                return model.report(lattice.index(value), opts)
        if value not in self._direct:
            depth = "extrapolate" if self.depths else "full"
            self._direct[value] = profile_depth(
                self.config, opts, self.provider, depth, self.name, self.progress
            )
        return self._direct[value]

    def _model(self, lattice: Lattice) -> _LatticeModel | None:
        if lattice not in self._models:
            try:
                self._models[lattice] = _LatticeModel.build(self, lattice)
            except TimelineMismatch as exc:
                warnings.warn(
                    f"trilora mem: the length extrapolation does not apply ({exc}); tracing "
                    "each value instead (slower, same result)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.progress.line(f"length extrapolation off ({exc}): tracing each value")
                self._models[lattice] = None
        return self._models[lattice]


@dataclass
class _DepthModel:
    first: StepTrace  # at the lattice's first index
    second: StepTrace  # at the next index
    lengths: LengthModel

    def report(self, n: int, opts: MemOptions, seconds: float) -> MemReport:
        d = n - self.lengths.n
        pinned = self.first.host_pinned + d * (self.second.host_pinned - self.first.host_pinned)
        return self.first.report(
            self.lengths.peak(n), opts, host_pinned=pinned, method="lattice", seconds=seconds
        )


@dataclass
class _LatticeModel:
    fast: FastProfiler
    depths: list[_DepthModel]
    seconds: float

    @classmethod
    def build(cls, fast: FastProfiler, lattice: Lattice) -> _LatticeModel:
        t0 = time.perf_counter()
        layer_counts = list(fast.depths) if fast.depths else [None]
        n = lattice.first
        models = []
        for i, layers in enumerate(layer_counts):
            traced = []
            for k in (n, n + 1, n + 2) if i == 0 else (n, n + 1):
                opts = replace(fast.opts, **{fast.dimension: k * lattice.step})
                recorder = TimelineRecorder()
                step = trace(
                    fast.config, opts, fast.provider, layers, fast.name, fast.progress, recorder
                )
                traced.append((step, recorder.timeline()))
            lengths = LengthModel.fit(traced[0][1], traced[1][1], n)
            if len(traced) == 3:
                lengths.check(traced[2][1], n + 2)
                pinned = [s.host_pinned for s, _ in traced]
                if pinned[2] - pinned[1] != pinned[1] - pinned[0]:
                    raise TimelineMismatch("pinned host memory is not affine in the length")
            models.append(_DepthModel(traced[0][0], traced[1][0], lengths))
        seconds = time.perf_counter() - t0
        fast.progress.line(
            f"length model: {len(layer_counts) * 2 + 1} traces at {fast.dimension} "
            f"{n * lattice.step:,}-{(n + 2) * lattice.step:,} [{seconds:.0f} s]; every multiple "
            f"of {lattice.step:,} from {n * lattice.step:,} on is now exact and immediate"
        )
        return cls(fast, models, seconds)

    def report(self, n: int, opts: MemOptions) -> MemReport:
        reps = [m.report(n, opts, self.seconds) for m in self.depths]
        if len(reps) == 1:
            return reps[0]
        rep = extrapolate_depth(reps[0], reps[1], self.fast.config.num_hidden_layers)
        rep.trace_seconds = self.seconds
        return rep
