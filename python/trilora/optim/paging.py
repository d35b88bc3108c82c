"""Where AdamW state lives, and how state kept off the device reaches the update kernel.

Each parameter's state (:class:`SlotState`) has its components: ``exp_avg`` and
``exp_avg_sq`` (fp32) for 32-bit state; ``state1``, ``state2`` (uint8) and ``absmax1``,
``absmax2`` (fp32, one per 256 elements) for 8-bit state. It has a *home*:

* ``"device"``: next to the parameter; the kernel updates it in place, one launch per
  parameter;
* ``"host"``: pinned host memory. A step cuts it into *pages* (element ranges of at most
  ``page_bytes`` of state, starting on 256-element boundaries) and :class:`HostPageStreamer`
  moves them through two device buffers: page ``k + 1`` is copied in on one side stream
  while page ``k`` is updated on the compute stream, and page ``k`` is copied back on a
  second side stream while page ``k + 1`` is updated;
* ``"uvm"``: CUDA managed memory from the native extension, advised to live on the host.
  :class:`ManagedPager` prefetches each page to the device just before its update (the next
  page while the current one is updated) and back to the host after it, so between steps
  the device holds none of it, and never prefetches more than the device has free.

A parameter's home can change between steps (``paging="auto"``): :func:`auto_moves` picks
which parameters move when device memory gets tight or frees up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trilora.optim.blockwise import QBLOCK, nblocks

ALIGN = 256
"""Byte alignment of every state component (16-byte vector loads, and cudaMemcpy-friendly)."""

DEFAULT_PAGE_BYTES = 32 << 20
"""Default page size: at ~25 GB/s of pinned PCIe bandwidth a 32 MiB page moves in ~1.3 ms,
long against the ~10 us cost of a copy launch, and the two device buffers cost 64 MiB."""

HOMES = ("device", "host", "uvm")


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def layout(bits: int, n: int) -> tuple[list[tuple[str, int, torch.dtype, int]], int]:
    """Components of the state of an ``n``-element parameter: ``[(name, byte offset, dtype,
    numel)]`` and the total bytes."""
    if bits == 32:
        comps = [("exp_avg", torch.float32, n), ("exp_avg_sq", torch.float32, n)]
    else:
        nb = nblocks(n)
        comps = [
            ("state1", torch.uint8, n),
            ("state2", torch.uint8, n),
            ("absmax1", torch.float32, nb),
            ("absmax2", torch.float32, nb),
        ]
    out, offset = [], 0
    for name, dtype, numel in comps:
        out.append((name, offset, dtype, numel))
        offset = _align(offset + numel * dtype.itemsize)
    return out, offset


def state_nbytes(bits: int, n: int) -> int:
    """Bytes of the state of an ``n``-element parameter."""
    comps, _ = layout(bits, n)
    return sum(numel * dtype.itemsize for _, _, dtype, numel in comps)


def page_buffer_nbytes(bits: int, n: int) -> int:
    """Bytes of a device buffer holding a page of ``n`` elements (aligned components)."""
    return layout(bits, n)[1]


def page_elems(bits: int, page_bytes: int) -> int:
    """Elements per page: a multiple of 256 whose state fits ``page_bytes``."""
    per_elem = 8.0 if bits == 32 else 2.0 + 8.0 / QBLOCK
    k = int((page_bytes - 4 * ALIGN) // per_elem) // QBLOCK * QBLOCK
    return max(QBLOCK, k)


def page_ranges(n: int, elems: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` covering ``range(n)`` in pages of ``elems`` elements."""
    return [(s, min(n, s + elems)) for s in range(0, n, elems)]


def views(buffer: torch.Tensor, bits: int, n: int) -> dict[str, torch.Tensor]:
    """Flat views of the components of an ``n``-element state laid out in ``buffer``."""
    comps, _ = layout(bits, n)
    return {
        name: buffer[offset : offset + numel * dtype.itemsize].view(dtype)
        for name, offset, dtype, numel in comps
    }


def slice_views(tensors: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """The part of each component that belongs to elements ``start:stop`` (``start`` a
    multiple of 256, so absmax blocks are whole)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("absmax"):
            out[name] = t[start // QBLOCK : nblocks(stop)]
        else:
            out[name] = t[start:stop]
    return out


class SlotState:
    """The AdamW state of one parameter of ``n`` (local) elements.

    Attributes:
        bits: 32 or 8.
        n: number of elements.
        home: ``"device"``, ``"host"`` or ``"uvm"`` (see the module docstring).
        device: where the components are (the parameter's device, the CPU for ``"host"``;
            managed tensors report the CUDA device).
        tensors: the components (``exp_avg``... or ``state1``...), flat, each its own
            allocation (``torch.save`` refuses tensors that view one storage as two dtypes).
        step: 0-dim fp32 CPU tensor, the step count (a tensor as in torch's AdamW, so
            checkpoint tools that call ``.cpu()`` on it work).
    """

    def __init__(
        self, bits: int, n: int, home: str, tensors: dict[str, torch.Tensor], step: torch.Tensor
    ):
        self.bits = bits
        self.n = n
        self.home = home
        self.tensors = tensors
        self.step = step

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @classmethod
    def allocate(
        cls, bits: int, n: int, home: str, device: torch.device, managed=None
    ) -> SlotState:
        """Zero-initialized state (zero codes and zero absmax: every moment is 0).

        ``device``: the parameter's device. ``home="host"`` pins the memory when that is a
        CUDA device; ``home="uvm"`` needs ``managed`` (the native extension).
        """
        comps, _ = layout(bits, n)
        tensors = {}
        for name, _, dtype, numel in comps:
            if home == "uvm":
                raw = managed.managed_zeros(numel * dtype.itemsize, device.index)
                tensors[name] = raw.view(dtype)
            elif home == "host":
                tensors[name] = torch.zeros(numel, dtype=dtype, pin_memory=device.type == "cuda")
            else:
                tensors[name] = torch.zeros(numel, dtype=dtype, device=device)
        return cls(bits, n, home, tensors, torch.zeros((), dtype=torch.float32))

    @property
    def state_bytes(self) -> int:
        """Bytes of the components."""
        return sum(t.nbytes for t in self.tensors.values())

    def moved(self, home: str, device: torch.device, managed=None) -> SlotState:
        """A copy of this state with another home (the caller drops this one)."""
        out = SlotState.allocate(self.bits, self.n, home, device, managed)
        for name, t in self.tensors.items():
            out.tensors[name].copy_(t)
        out.step = self.step
        return out


# ---------------------------------------------------------------------------------------
# streaming host pages through the device
# ---------------------------------------------------------------------------------------


@dataclass
class Page:
    """One unit of work: elements ``start:stop`` of ``state``; ``launch(views)`` runs the
    update on views of the state components that live on the compute device."""

    state: SlotState
    start: int
    stop: int
    launch: Callable[[dict[str, torch.Tensor]], None]


class HostPageStreamer:
    """Double-buffered pipeline of host pages through two device buffers (see the module
    docstring). On a CPU "device" (tests under the Triton interpreter) the same sequence
    runs with plain synchronous copies."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None, None]
        self._cuda = device.type == "cuda"
        self._h2d = torch.cuda.Stream(device) if self._cuda else None
        self._d2h = torch.cuda.Stream(device) if self._cuda else None
        self._done: list = [None, None]  # per buffer: event after its last copy back

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b is not None)

    def synchronize(self) -> None:
        """Wait until every page copied back to the host has landed there."""
        for event in self._done:
            if event is not None:
                event.synchronize()

    def release(self) -> None:
        """Free the device buffers (after :meth:`synchronize`)."""
        self.synchronize()
        self.buffers = [None, None]
        self._done = [None, None]

    def _reserve(self, nbytes: int) -> None:
        if all(b is not None and b.numel() >= nbytes for b in self.buffers):
            return
        self.synchronize()
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self.buffers = [
            torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)
        ]

    def run(self, pages: Sequence[Page]) -> None:
        """Update every page: copy in, ``launch``, copy back. Returns without waiting for
        the last copies back (see :meth:`synchronize`)."""
        if not pages:
            return
        self._reserve(max(page_buffer_nbytes(pg.state.bits, pg.stop - pg.start) for pg in pages))
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        if self._cuda:
            # Gradients come from the compute stream; host pages from last step's copies.
            self._h2d.wait_stream(compute)
            self._h2d.wait_stream(self._d2h)
        for k, page in enumerate(pages):
            which = k % 2
            work = views(self.buffers[which], page.state.bits, page.stop - page.start)
            host = slice_views(page.state.tensors, page.start, page.stop)
            if not self._cuda:
                for name, t in work.items():
                    t.copy_(host[name])
                page.launch(work)
                for name, t in host.items():
                    t.copy_(work[name])
                continue
            with torch.cuda.stream(self._h2d):
                if self._done[which] is not None:
                    # The buffer's previous page must be back on the host first.
                    self._h2d.wait_event(self._done[which])
                for name, t in work.items():
                    t.copy_(host[name], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._h2d)
            compute.wait_event(ready)
            page.launch(work)
            updated = torch.cuda.Event()
            updated.record(compute)
            with torch.cuda.stream(self._d2h):
                self._d2h.wait_event(updated)
                for name, t in host.items():
                    t.copy_(work[name], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._d2h)
            self._done[which] = done


class ManagedPager:
    """Prefetch pages of managed-memory state to the device for their update and back to the
    host after it, on a side stream, one page ahead (see the module docstring).

    ``ext`` is the loaded native extension (``prefetch``). A page is prefetched to the
    device only while the device has that much memory free beyond ``reserve`` bytes;
    otherwise the kernel reads it where it is (slower, never out of memory).
    """

    def __init__(self, ext, device: torch.device, reserve: int = 256 << 20):
        self.ext = ext
        self.device = device
        self.reserve = reserve
        self._stream = torch.cuda.Stream(device)
        self._last = None

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.synchronize()

    def _prefetch(self, page: Page, to_device: bool) -> None:
        parts = slice_views(page.state.tensors, page.start, page.stop)
        nbytes = sum(t.nbytes for t in parts.values())
        if to_device and torch.cuda.mem_get_info(self.device)[0] < nbytes + self.reserve:
            return
        target = self.device.index if to_device else -1
        for t in parts.values():
            self.ext.prefetch(t, target, self._stream.cuda_stream)

    def run(self, pages: Sequence[Page]) -> None:
        if not pages:
            return
        compute = torch.cuda.current_stream(self.device)
        side = self._stream
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            self._prefetch(pages[0], True)
            ready = torch.cuda.Event()
            ready.record(side)
        for k, page in enumerate(pages):
            compute.wait_event(ready)
            if k + 1 < len(pages):
                # Recorded before the wait below, so page k + 1's update does not also wait
                # for page k's trip back to the host.
                with torch.cuda.stream(side):
                    self._prefetch(pages[k + 1], True)
                    ready = torch.cuda.Event()
                    ready.record(side)
            page.launch(slice_views(page.state.tensors, page.start, page.stop))
            updated = torch.cuda.Event()
            updated.record(compute)
            side.wait_event(updated)
            with torch.cuda.stream(side):
                self._prefetch(page, False)
        self._last = torch.cuda.Event()
        self._last.record(side)


# ---------------------------------------------------------------------------------------
# paging="auto"
# ---------------------------------------------------------------------------------------


def auto_headroom(total_bytes: int) -> int:
    """Device memory ``paging="auto"`` keeps free beyond the observed peak: 5% of the device,
    at least 256 MiB (allocator fragmentation, the CUDA context's growth, other tensors)."""
    return max(256 << 20, int(0.05 * total_bytes))


def auto_moves(
    slots: Sequence[tuple[int, bool]], slack: int, headroom: int
) -> tuple[list[int], list[int]]:
    """Which states ``paging="auto"`` moves, given ``slack`` bytes of device memory to spare
    at the observed peak (negative: the peak is too close to the device's capacity).

    ``slack`` is already net of one ``headroom`` (see :meth:`AutoTracker.slack`).
    ``slots``: ``(state bytes, on device)`` per state, in allocation order. Returns
    ``(demote, promote)`` index lists: under pressure (``slack < 0``), device states from the
    most recently allocated back until ``-slack`` bytes are freed; with room to spare
    (``slack > headroom``), host states in allocation order while they fit in
    ``slack - headroom``. Between the two nothing moves, so states do not ping-pong.
    """
    demote: list[int] = []
    promote: list[int] = []
    if slack < 0:
        freed = 0
        for i in range(len(slots) - 1, -1, -1):
            if freed >= -slack:
                break
            nbytes, on_device = slots[i]
            if on_device:
                demote.append(i)
                freed += nbytes
    elif slack > headroom:
        room = slack - headroom
        for i, (nbytes, on_device) in enumerate(slots):
            if not on_device and nbytes <= room:
                promote.append(i)
                room -= nbytes
    return demote, promote


@dataclass
class AutoTracker:
    """Peak bookkeeping of ``paging="auto"`` on one CUDA device.

    The caching allocator's peak (``torch.cuda.max_memory_allocated``) only grows, and the
    optimizer does not reset it (that would take it from the user). So the tracker remembers
    how many bytes of state it moved off the device since that peak was last seen to change:
    the peak a training step would reach now is the recorded one minus those bytes.
    """

    peak_seen: int = -1
    moved_since_peak: int = 0

    def slack(self, device: torch.device) -> tuple[int, int]:
        """``(slack, headroom)``: bytes of device memory to spare at the expected peak of a
        training step, beyond ``headroom``."""
        total = torch.cuda.get_device_properties(device).total_memory
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        others = max(0, total - free - reserved)  # CUDA context, other processes
        peak = torch.cuda.max_memory_allocated(device)
        if peak != self.peak_seen:
            self.peak_seen, self.moved_since_peak = peak, 0
        headroom = auto_headroom(total)
        expected_peak = peak - self.moved_since_peak
        return total - others - headroom - expected_peak, headroom

    def moved(self, demoted: int, promoted: int) -> None:
        self.moved_since_peak += demoted - promoted


__all__ = [
    "ALIGN",
    "DEFAULT_PAGE_BYTES",
    "HOMES",
    "AutoTracker",
    "HostPageStreamer",
    "ManagedPager",
    "Page",
    "SlotState",
    "auto_headroom",
    "auto_moves",
    "layout",
    "page_buffer_nbytes",
    "page_elems",
    "page_ranges",
    "slice_views",
    "state_nbytes",
    "views",
]
