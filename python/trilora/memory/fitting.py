"""The budget search's bisection, shared by the traced and the analytical (MoE) models."""

from __future__ import annotations

__all__ = ["largest_fitting"]


def largest_fitting(
    fn, budget: int, step: int, guess: int, limit: int = 2**24
) -> tuple[int, dict[int, int]]:
    """Largest multiple ``v`` of ``step`` with ``fn(v) <= budget``, for a nondecreasing ``fn``.

    ``fn`` maps a value to bytes and is expensive (a trace), so the search interpolates
    linearly between the closest fitting and non-fitting values (peak memory is close to
    piecewise affine in the sequence length and batch) and bisects when interpolation
    stalls. It stops only when ``v`` fits and ``v + step`` does not (both evaluated), or at
    ``limit``. Returns ``(v, {value: bytes evaluated})``; ``v`` is 0 if ``step`` does not fit.
    """
    seen: dict[int, int] = {}

    def f(v: int) -> int:
        if v not in seen:
            seen[v] = fn(v)
        return seen[v]

    def snap(v: float) -> int:
        return max(step, int(v) // step * step)

    lo, hi = 0, None  # lo fits (0: nothing fits yet), hi does not fit
    g = snap(guess)
    interpolated = False  # was g an interpolated guess
    rounds = 0
    while True:
        g = min(g, limit)
        fits = f(g) <= budget
        if fits:
            lo = g
            if g >= limit:
                return lo, seen
        else:
            hi = g
        if hi is not None and hi - lo <= step:
            return lo, seen
        if hi is None:
            # Nothing too big yet: extrapolate upward from the two largest points (all fit).
            xs = sorted(seen)
            if len(xs) < 2:
                # One point: its next step up (ends it when the guess was the answer).
                g = lo + step
            elif seen[xs[-1]] > seen[xs[-2]]:
                slope = (seen[xs[-1]] - seen[xs[-2]]) / (xs[-1] - xs[-2])
                g = snap(xs[-1] + (budget - seen[xs[-1]]) / slope) + step
            else:
                g = 2 * lo
            g = max(g, lo + step)
            continue
        if lo == 0:
            g = snap(hi / 2)
            if g >= hi:
                return 0, seen
            continue
        if fits and interpolated:
            # An interpolated guess fits: the next step up usually does not, which ends it.
            g, interpolated = lo + step, False
            continue
        rounds += 1
        slope = (seen[hi] - seen[lo]) / (hi - lo)
        if rounds > 3 or slope <= 0:
            g, interpolated, rounds = snap((lo + hi) / 2), False, 0  # stalled: bisect
        else:
            g, interpolated = snap(lo + (budget - seen[lo]) / slope), True
        g = min(max(g, lo + step), hi - step)
