"""Progress of ``trilora mem``'s traces: a bar on a terminal, one line per result otherwise.

A trace advances twice per decoder layer (its forward, then its backward), so the bar moves
during the minutes a full-depth long-context trace takes, not only between traces. The bar
(tqdm, on stderr) is shown only when stderr is a terminal; the result lines are always
written (through the bar, so they do not tear it), so logs and CI keep the record.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator


class Progress:
    """Silent progress; result lines go to ``log`` when given (e.g. ``print``)."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self._log = log

    @contextlib.contextmanager
    def trace(self, desc: str, ticks: int) -> Iterator[Callable[[], None]]:
        """One trace of ``ticks`` steps is running; yields the function to call per step."""
        yield _nothing

    def line(self, text: str) -> None:
        if self._log is not None:
            self._log(text)

    def close(self) -> None:
        pass


def _nothing() -> None:
    pass


class BarProgress(Progress):
    """One tqdm bar on ``stream`` for every trace of a command; its total grows as traces
    start. ``bar=None``: only when ``stream`` is a terminal."""

    def __init__(self, stream=None, bar: bool | None = None, prefix: str = "  "):
        self.stream = sys.stderr if stream is None else stream
        super().__init__(lambda text: self._write(text))
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self.prefix = prefix
        self._bar = None
        if bar:
            from tqdm import tqdm

            # A terminal that reports no size (a bare pty) would hide the bar.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(
                total=0,
                unit="layer",
                file=self.stream,
                leave=False,
                ncols=min(size.columns or 100, 120),
                nrows=max(size.lines, 2),
                bar_format="{desc} {bar} {n}/{total} layer passes [{elapsed}<{remaining}]",
            )

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(self.prefix + text, file=self.stream)
        else:
            print(self.prefix + text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def trace(self, desc: str, ticks: int) -> Iterator[Callable[[], None]]:
        bar = self._bar
        if bar is None:
            yield _nothing
            return
        start = bar.n
        bar.total += ticks
        bar.set_description_str(desc, refresh=False)
        bar.refresh()

        def tick() -> None:
            if bar.n < start + ticks:
                bar.update(1)

        try:
            yield tick
        finally:
            if bar.n < start + ticks:
                bar.update(start + ticks - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def as_progress(progress) -> Progress:
    """``progress`` as a :class:`Progress`: None -> silent, a callable -> its lines only."""
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Progress(log=progress)
    raise TypeError(
        f"progress must be a Progress, a callable or None, got {type(progress).__name__}"
    )
