"""Per-op memory timelines of a traced step, and their exact extrapolation along the length.

Why: a long-context step is mostly loops whose trip count grows with the length, 2,048-token
MLP chunks in every layer (forward, recompute, backward) and 512-token chunks of the fused
cross-entropy (for Llama-3.1-8B), so tracing it costs time proportional to the length: 643 s
for the full-depth step at 203,776 tokens on two cores. The memory of such a step can be
computed from three short traces instead.

The argument. Take lengths on a lattice ``T = n * P`` where every length-dependent loop is
*regular*: the MLP and loss chunks all have the same size (``P`` = 2,048 for auto MLP chunks),
so going from ``n`` to ``n + 1`` adds repetitions to each loop and changes no other op. The
tracker samples the live bytes of every category after every op. Split that sequence at loop
markers (the start and end of each MLP chunk, each loss chunk) and key each piece by where
it sits: outside loops, or in repetition 0, 1, N-2 or N-1 of loop ``k`` (from either end).
Then

1. every keyed piece has the same ops for every ``n``, and each op's bytes are affine in
   ``n`` (each live tensor has a constant size or one proportional to the length), so two
   traces give every keyed op's bytes at any ``n``, exactly, in integers;
2. inside one loop the repetitions 1 .. N-2 differ by a constant per op (each repetition
   leaves the same bytes behind: one chunk's output, one chunk's gradient), so an op's bytes
   over those repetitions are affine in the repetition index and their maximum is at
   repetition 1 or N-2, which are keyed: the middle repetitions can never hold the peak.

The peak at length ``n * P`` is therefore the maximum over the keyed ops extrapolated to
``n``, with the category split of that op: what the full trace records, to the byte. A third
trace checks both facts at run time (its keyed ops must equal the extrapolation, its middle
repetitions must be affine); if either fails, :class:`TimelineMismatch` is raised and the
caller traces the length itself.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import numpy as np

from trilora.patches.activation_checkpointing import find_decoder_layers

# The tracker's categories, in a fixed column order (torch.distributed._tools.mem_tracker's
# _MemRefType values).
COLUMNS = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")
_INDEX = {c: i for i, c in enumerate(COLUMNS)}

# Ops that start one repetition of a loop by themselves: the fused cross-entropy's per-chunk
# op (trilora.ops.linear_cross_entropy), one call per chunk of tokens.
LOOP_OPS = {"trilora::cross_entropy_inplace_": "loss"}


class TimelineMismatch(RuntimeError):
    """The traces do not have the structure the extrapolation needs (see the module doc)."""


@dataclass
class TimelineRecorder:
    """Collects the tracker's snapshot after every op, and loop markers, during one trace."""

    rows: list[tuple[int, ...]] = field(default_factory=list)
    # (row index where a piece starts, loop id, marker kind)
    marks: list[tuple[int, tuple, str]] = field(default_factory=list)
    _loops: dict[str, object] = field(default_factory=dict)
    _ordinal: dict[str, int] = field(default_factory=dict)
    _index: dict = field(default_factory=dict)  # tracker key -> column (None: not a column)

    def row(self, snapshot: dict) -> None:
        """The tracker's snapshot after one op. Only changes are kept: ops that allocate
        nothing (views, ``prim::device`` queries the tracker itself makes once per output
        tensor, so once per chunk of a split) cannot set a new peak, and their number may
        depend on the length outside any loop."""
        out = [0] * len(COLUMNS)
        index = self._index
        for key, value in snapshot.items():
            i = index.get(key, -1)
            if i == -1:
                i = index[key] = _INDEX.get(str(getattr(key, "value", key)))
            if i is not None:
                out[i] = value
        row = tuple(out)
        if not self.rows or self.rows[-1] != row:
            self.rows.append(row)

    def mark(self, loop: tuple, kind: str) -> None:
        self.marks.append((len(self.rows), loop, kind))

    def op(self, name: str, backward: bool) -> None:
        """Called before each op is dispatched: marks loop ops (:data:`LOOP_OPS`)."""
        loop = LOOP_OPS.get(name)
        if loop is not None:
            self.mark((loop, "backward" if backward else "forward"), "start")

    # --- MLP chunk loops -------------------------------------------------------------------

    @contextlib.contextmanager
    def loop(self, owner: str):
        """A chunked call of ``owner`` (one MLP) is running: its chunks form one loop."""
        n = self._ordinal.get(owner, 0)
        self._ordinal[owner] = n + 1
        previous = self._loops.get(owner)
        self._loops[owner] = n
        try:
            yield
        finally:
            if previous is None:
                del self._loops[owner]
            else:
                self._loops[owner] = previous

    @contextlib.contextmanager
    def chunk(self, owner: str):
        """One chunk of ``owner``: inside a chunked call, or alone (the recompute of one
        chunk during backward, which autograd runs chunk by chunk)."""
        loop = ("mlp", owner, self._loops.get(owner, "backward"))
        self.mark(loop, "start")
        try:
            yield
        finally:
            self.mark(loop, "end")

    def timeline(self) -> Timeline:
        return Timeline(np.asarray(self.rows, dtype=np.int64).reshape(-1, len(COLUMNS)), self.marks)


def instrument_chunks(model, recorder: TimelineRecorder) -> None:
    """Mark every decoder layer's MLP call as one chunk (before checkpointing is enabled).

    The MLP's class is swapped for a subclass whose ``forward`` reports to ``recorder``:
    :func:`trilora.patches.activation_checkpointing.enable_checkpointing` binds the class's ``forward`` for its
    chunks, so each chunk, and each recompute of one, is marked. Memory is unaffected.
    """

    for i, layer in enumerate(find_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        owner = f"layers.{i}.mlp"
        cls = type(mlp)

        def forward(self, *args, _owner=owner, _cls=cls, **kwargs):
            with recorder.chunk(_owner):
                return _cls.forward(self, *args, **kwargs)

        mlp.__class__ = type(
            cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__}
        )


def instrument_loops(model, recorder: TimelineRecorder) -> None:
    """Mark every chunked MLP call as one loop (after checkpointing is enabled)."""

    for i, layer in enumerate(find_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        chunked = getattr(mlp, "__dict__", {}).get("forward")
        if chunked is None:
            continue
        owner = f"layers.{i}.mlp"

        @functools.wraps(chunked)
        def forward(*args, _owner=owner, _chunked=chunked, **kwargs):
            with recorder.loop(_owner):
                return _chunked(*args, **kwargs)

        mlp.forward = forward


# ---------------------------------------------------------------------------------------
# alignment and extrapolation
# ---------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """Bytes per category after every op of one traced step (``rows``: ``[ops, 7]`` int64,
    columns :data:`COLUMNS`), and the loop markers (row index, loop id, kind)."""

    rows: np.ndarray
    marks: list[tuple[int, tuple, str]]

    def pieces(self) -> tuple[list[tuple[tuple, np.ndarray]], dict]:
        """The keyed pieces in time order, and the affine range of each loop.

        Returns ``(keyed, middle)``. ``keyed`` is ``[(key, rows)]`` with keys ``("begin",)``
        or ``(loop, kind, role)``, ``role`` one of ``"first"``, ``"second"``,
        ``"penultimate"``, ``"last"`` (repetitions 0, 1, N-2, N-1 of the loop; with N = 3 the
        second is also the penultimate and appears twice). ``middle`` maps ``(loop, kind)`` to
        ``{repetition: rows}`` for repetitions 1 .. N-2, whose per-op bytes must be affine in
        the repetition (checked by :func:`_check_middle`), so that the keyed second and
        penultimate repetitions bound every one of them.
        """
        counts: dict[tuple, int] = {}
        for _, loop, kind in self.marks:
            counts[(loop, kind)] = counts.get((loop, kind), 0) + 1
        seen: dict[tuple, int] = {}
        keyed: list[tuple[tuple, np.ndarray]] = [(("begin",), self.rows[: self._start(0)])]
        middle: dict[tuple, dict[int, np.ndarray]] = {}
        for j, (start, loop, kind) in enumerate(self.marks):
            piece = self.rows[start : self._start(j + 1)]
            rep = seen.get((loop, kind), 0)
            seen[(loop, kind)] = rep + 1
            n = counts[(loop, kind)]
            if n < 3:
                # too short to have an affine range: every repetition is its own key (the
                # count must then be the same at every length)
                keyed.append(((loop, kind, f"repetition {rep} of {n}"), piece))
                continue
            if 1 <= rep <= n - 2:
                middle.setdefault((loop, kind), {})[rep] = piece
            roles = (
                ["first"] * (rep == 0)
                + ["second"] * (rep == 1)
                + ["penultimate"] * (rep == n - 2)
                + ["last"] * (rep == n - 1)
            )
            keyed.extend(((loop, kind, role), piece) for role in roles)
        return keyed, middle

    def _start(self, j: int) -> int:
        return self.marks[j][0] if j < len(self.marks) else len(self.rows)


def _check_middle(middle: dict) -> None:
    for key, reps in middle.items():
        order = sorted(reps)
        if len(order) < 3:
            continue
        first, second = reps[order[0]], reps[order[1]]
        if first.shape != second.shape:
            raise TimelineMismatch(f"loop {key}: repetitions differ in op count")
        step = second - first
        for i, r in enumerate(order[2:], start=2):
            if reps[r].shape != first.shape or not np.array_equal(reps[r], first + i * step):
                raise TimelineMismatch(f"loop {key}: repetition {r} is not affine in the index")


def _aligned(a: Timeline, b: Timeline):
    """Pairs ``(key, rows at a, rows at b)`` in ``b``'s time order.

    ``b`` is the longer trace: where a loop is short in ``a`` (3 repetitions), its second
    repetition is also its penultimate one, keyed twice, and ``b``'s order (all roles
    distinct) is the order of every longer step.
    """
    ka, ma = a.pieces()
    kb, mb = b.pieces()
    rows_a = dict(ka)
    if len(rows_a) != len(ka) or set(rows_a) != {k for k, _ in kb}:
        raise TimelineMismatch("the traces have different loop structures")
    pairs = []
    for key, rb in kb:
        ra = rows_a[key]
        if ra.shape != rb.shape:
            raise TimelineMismatch(
                f"piece {key} has {len(ra)} ops at one length, {len(rb)} at the next"
            )
        pairs.append((key, ra, rb))
    _check_middle(ma)
    _check_middle(mb)
    return pairs


@dataclass
class LengthModel:
    """Exact per-op extrapolation from traces at lattice indices ``n`` and ``n + 1``."""

    n: int
    base: list[tuple[tuple, np.ndarray]]
    slope: list[np.ndarray]

    @classmethod
    def fit(cls, a: Timeline, b: Timeline, n: int) -> LengthModel:
        """From the traces at indices ``n`` (``a``) and ``n + 1`` (``b``)."""
        pairs = _aligned(a, b)
        return cls(n, [(k, ra) for k, ra, _ in pairs], [rb - ra for _, ra, rb in pairs])

    def rows(self, n: int) -> np.ndarray:
        """Every keyed op's bytes at lattice index ``n`` (time order)."""
        d = n - self.n
        return np.concatenate([r + d * s for (_, r), s in zip(self.base, self.slope)])

    def peak(self, n: int) -> dict[str, int]:
        """The tracker's categories at the peak of the step at index ``n`` (the first op with
        the largest total, as the tracker records it)."""
        rows = self.rows(n)
        if (rows < 0).any():
            raise TimelineMismatch(f"negative bytes extrapolated at index {n}")
        i = int(np.argmax(rows.sum(axis=1)))
        return {c: int(v) for c, v in zip(COLUMNS, rows[i])}

    def check(self, c: Timeline, n: int) -> None:
        """Raise :class:`TimelineMismatch` unless ``c`` (the trace at index ``n``) equals the
        extrapolation op for op, and its middle repetitions are affine."""
        kc, mc = c.pieces()
        rows_c = dict(kc)
        if len(rows_c) != len(kc) or set(rows_c) != {k for k, _ in self.base}:
            raise TimelineMismatch("the check trace has a different loop structure")
        _check_middle(mc)
        got = np.concatenate([rows_c[k] for k, _ in self.base])
        want = self.rows(n)
        if got.shape != want.shape or not np.array_equal(got, want):
            raise TimelineMismatch(f"the trace at index {n} differs from the extrapolation")
